"""``propagation_strength`` as one policy: which modules QEP corrects, and how strongly.

The field is a number ``a`` in [0, 1] (``W* = W + a W C (H~ + l I)^-1``,
:mod:`qep_modifier.correction`), ``auto``, or a mapping from module-name regex
(``re.search``, first match in mapping order wins) to one, with the key
``default`` for the names no pattern matches (0 when absent).

``auto`` chooses each module's strength from
:data:`~qep_modifier.correction.AUTO_CANDIDATES`. The calibration batches are
split in two: ordered by a digest of their first layer's input over every rank,
every other one is held out, so the split is the same however the batches are
spread over ranks. The candidate whose correction, fitted on the other batches,
leaves the smallest output error on the held-out ones wins (closed form,
:func:`~qep_modifier.correction.choose_strength`); the module is then corrected
with it on all batches. Without calibration tokens on both sides of the split
the module falls back to :data:`FALLBACK_STRENGTH`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from loguru import logger

from qep_modifier.correction import choose_strength
from qep_modifier.distributed import gather, rank
from qep_modifier.plan import expert_role
from qep_modifier.statistics import LinearStatistics

__all__ = [
    "check_propagation_strength",
    "AUTO",
    "DEFAULT_PROPAGATION_STRENGTH",
    "DEFAULT_STRENGTH_KEY",
    "StrengthPolicy",
    "held_out_split",
    "resolve_propagation_strength",
    "unmatched_patterns",
]

#: the mapping key for the names no pattern matches
DEFAULT_STRENGTH_KEY = "default"
#: ``propagation_strength: auto``: chosen per module from held-out batches
AUTO = "auto"

# The reference implementation corrects every Linear with strength 0.5 except
# the MLP down projection: its input is the widest in the block (the
# intermediate size), so its d_in x d_in solve is the most expensive and the
# least well conditioned, and correcting it did not pay off there.
DEFAULT_PROPAGATION_STRENGTH: dict[str, float] = {
    r"(^|\.)down_proj$": 0.0,
    DEFAULT_STRENGTH_KEY: 0.5,
}
#: ``auto`` without batches on both sides of its split
FALLBACK_STRENGTH = float(DEFAULT_PROPAGATION_STRENGTH[DEFAULT_STRENGTH_KEY])


def check_propagation_strength(value):
    """``value`` when it is a ``propagation_strength`` a recipe may set (a number
    in [0, 1], ``auto``, or a mapping of valid regular expressions and
    ``default`` to those), else ``ValueError`` in one line naming what is wrong."""
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    for pattern, strength in items:
        where = "" if pattern is None else f"[{pattern!r}]"
        if strength == AUTO:
            continue
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(
                f"propagation_strength{where} must be a number in [0, 1] or "
                f"'auto', got {strength!r}"
            )
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(
                f"propagation_strength{where} = {strength} is outside the "
                "allowed range [0, 1]"
            )
        if pattern is not None and pattern != DEFAULT_STRENGTH_KEY:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"propagation_strength pattern {pattern!r} is not a valid "
                    f"regular expression: {error}"
                ) from error
    return value


def resolve_propagation_strength(
    module_name: str, strength: float | str | Mapping[str, float | str]
) -> float | str:
    """The propagation strength for ``module_name``: a number or ``"auto"``
    (a mapping: first pattern found in the name wins, else ``default``, else 0)."""
    if not isinstance(strength, Mapping):
        return _strength_value(strength)
    for pattern, value in strength.items():
        if pattern == DEFAULT_STRENGTH_KEY:
            continue
        if re.search(pattern, module_name):
            return _strength_value(value)
    return _strength_value(strength.get(DEFAULT_STRENGTH_KEY, 0.0))


def _strength_value(value) -> float | str:
    return AUTO if value == AUTO else float(value)


def unmatched_patterns(strength, names: Iterable[str]) -> list[str]:
    """The patterns of a ``propagation_strength`` mapping that match no name."""
    if not isinstance(strength, Mapping):
        return []
    names = list(names)
    return [
        pattern
        for pattern in strength
        if pattern != DEFAULT_STRENGTH_KEY and not any(re.search(pattern, name) for name in names)
    ]


def warn_unmatched_patterns(strength, names: Iterable[str]) -> None:
    """One warning naming the ``propagation_strength`` patterns that match no
    target module (a misspelled pattern would silently leave its modules at the
    default)."""
    unmatched = unmatched_patterns(strength, names)
    if unmatched:
        logger.warning(
            "QEP: propagation_strength patterns match no target module: "
            + ", ".join(repr(pattern) for pattern in unmatched)
        )


def held_out_split(digests_by_rank: list[list[str]], this_rank: int) -> list[bool]:
    """Which of ``this_rank``'s batches ``auto`` holds out: every batch of every
    rank ordered by its digest (then rank, then index), every other one held out."""
    everyone = sorted(
        (digest, owner, index)
        for owner, part in enumerate(digests_by_rank)
        for index, digest in enumerate(part)
    )
    held = {(owner, index) for position, (_, owner, index) in enumerate(everyone) if position % 2}
    return [(this_rank, index) in held for index in range(len(digests_by_rank[this_rank]))]


def batch_digest(hidden: torch.Tensor) -> str:
    """A batch's name for the split: the digest of its input's float32 bytes."""
    data = hidden.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class StrengthPolicy:
    """Each module's strength by name, and ``auto``'s split and choices in a run.

    :param strengths: a number or ``auto`` per module name
    :param correction_damping: ``l`` of the corrections ``auto`` compares
    :param held_out: which of this rank's batches ``auto`` holds out (``None``
        until :meth:`split`)
    :param chosen: ``auto``'s strength per module name (on the rank that chose it)
    """

    strengths: dict[str, float | str]
    correction_damping: float
    held_out: list[bool] | None = None
    chosen: dict[str, float] = field(default_factory=dict)

    @classmethod
    def resolve(cls, setting, names: Iterable[str], correction_damping: float) -> "StrengthPolicy":
        """The policy of a ``propagation_strength`` field over ``names``."""
        return cls(
            {name: resolve_propagation_strength(name, setting) for name in names},
            correction_damping,
        )

    def strength(self, name: str) -> float | str:
        return self.strengths.get(name, 0.0)

    def is_auto(self, name: str) -> bool:
        return self.strength(name) == AUTO

    def corrects(self, name: str) -> bool:
        """Whether ``name`` is corrected at all (a strength above 0, or auto)."""
        strength = self.strength(name)
        return strength == AUTO or strength > 0.0

    @property
    def any_auto(self) -> bool:
        return any(strength == AUTO for strength in self.strengths.values())

    def split(self, hiddens: Iterable[torch.Tensor]) -> None:
        """Hold out every other batch over all ranks (see :func:`held_out_split`),
        from each local batch's first-layer input ``hiddens``."""
        digests = [batch_digest(hidden) for hidden in hiddens]
        self.held_out = held_out_split(gather(digests), rank())

    def choose(
        self,
        name: str,
        weight: torch.Tensor,
        statistics: LinearStatistics,
        held_out: LinearStatistics | None,
    ) -> tuple[float, bool]:
        """``auto``: ``(strength, fell back)``: the strength whose correction
        fitted on the other batches does best on the held-out ones, or
        :data:`FALLBACK_STRENGTH` without batches on both sides."""
        two_sides = held_out is not None and held_out.paired and held_out.num_samples.item() > 0
        fit = statistics.minus(held_out) if two_sides else None
        if fit is None or fit.num_samples.item() == 0:
            self.chosen[name] = FALLBACK_STRENGTH
            return FALLBACK_STRENGTH, True
        fit_hessian, fit_cross, _ = fit.normalised()
        held_hessian, held_cross, held_gram = held_out.normalised()
        self.chosen[name], _ = choose_strength(
            weight.detach(),
            (fit_cross, fit_hessian),
            (held_gram, held_cross, held_hessian),
            self.correction_damping,
        )
        return self.chosen[name], False


def merged_choices(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Every rank's ``auto`` choices in one mapping (a name is chosen on one rank)."""
    return {name: strength for part in parts for name, strength in part.items()}


def choices_summary(chosen: Mapping[str, float]) -> str | None:
    """One line: ``auto``'s chosen strengths averaged per module role (layer
    index and expert number left out), or ``None`` when nothing was chosen."""
    if not chosen:
        return None
    roles: dict[str, list[float]] = {}
    for name, strength in chosen.items():
        role = expert_role(re.sub(r"\.\d+\.", ".*.", name, count=1))
        roles.setdefault(role, []).append(strength)
    shown = ", ".join(
        f"{role}: {sum(values) / len(values):.2f} ({len(values)})" for role, values in roles.items()
    )
    return f"QEP: propagation_strength auto chose, on average per role: {shown}"
