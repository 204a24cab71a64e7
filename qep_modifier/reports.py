"""What a calibration run tells its user: the modules that did not get the full
method (:class:`ProblemLog`) and the relative output errors (:class:`ErrorReport`).

Under torch.distributed each rank keeps what it saw (a module is quantized by
one owner rank); at the end the parts merge in rank order, so every rank holds
the same summary (:mod:`qep_modifier.distributed` gathers them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loguru import logger

__all__ = ["PROBLEMS", "ErrorReport", "ProblemLog"]

# what can go wrong for a module, and what it means (one summary at the end)
PROBLEMS = {
    "unpaired": "the full-precision and quantized streams sent them different tokens "
    "(mixture-of-experts routing), so they were quantized without correction; "
    "oneshot's moe_calibrate_all_experts=True (its default) feeds every expert every "
    "token and pairs them",
    "outside": "they lie outside the decoder layers, where there is no full-precision "
    "stream, so they were quantized without correction",
    "uncorrected": "the correction was skipped (H~ + l I stayed indefinite), so they "
    "were quantized from their original weights",
    "uncalibrated": "they saw no calibration token and were rounded to nearest from "
    "their own weights (no GPTQ, no correction)",
    "rtn_fallback": "GPTQ's Hessian inversion failed and they were rounded to nearest "
    "(raise dampening_frac or use more calibration samples)",
    "auto_fallback": "propagation_strength auto needs calibration batches on both sides of "
    "its split (at least two batches); they were corrected with 0.5",
    "norm_untuned": "block tuning left these norms as they were: an output gain cannot "
    "stand for a change of their parameters (no per-channel weight, or an output that is "
    "not (weight + offset) x a normalised input (+ bias); the reason per norm at DEBUG level)",
    "tuning_fallback": "block tuning did not lower their output error (or left it not "
    "finite), so they kept their untuned scales and norm weights (see "
    "block_tuning_learning_rate)",
    "end_to_end_fallback": "end-to-end tuning did not lower the KL divergence from the "
    "full-precision model's output (or left it not finite), so the model kept the scales "
    "and norm weights it had before (see end_to_end_learning_rate)",
}

#: names shown per reason in the warning (all of them at DEBUG level)
_SHOWN = 10


@dataclass
class ProblemLog:
    """Module names by reason (a key of :data:`PROBLEMS`), each name once, in
    the order noted."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def note(self, reason: str, name: str) -> None:
        names = self.by_reason.setdefault(reason, [])
        if name not in names:
            names.append(name)

    def extend(self, other: "ProblemLog") -> None:
        for reason, names in other.by_reason.items():
            for name in names:
                self.note(reason, name)

    @classmethod
    def merged(cls, parts: Iterable["ProblemLog"]) -> "ProblemLog":
        """The parts (one per rank, in rank order) as one log."""
        log = cls()
        for part in parts:
            log.extend(part)
        return log

    def as_dict(self) -> dict[str, list[str]]:
        return {reason: list(names) for reason, names in self.by_reason.items()}

    def warning(self) -> str | None:
        """One warning: which modules did not get the full method, and why."""
        if not self.by_reason:
            return None
        lines = []
        for reason, names in self.by_reason.items():
            shown = ", ".join(names[:_SHOWN])
            if len(names) > _SHOWN:
                shown += f" and {len(names) - _SHOWN} more (all at DEBUG level)"
            lines.append(f"- {len(names)} module(s): {PROBLEMS[reason]}: {shown}")
        return "QEP: not every module got the full method:\n" + "\n".join(lines)

    def warn(self) -> None:
        """Log :meth:`warning`, and every name of a long list at DEBUG level."""
        for reason, names in self.by_reason.items():
            if len(names) > _SHOWN:
                logger.debug(f"QEP: {reason}: " + ", ".join(names))
        if self.by_reason:
            logger.warning(self.warning())


@dataclass
class ErrorReport:
    """``report_errors``: one row per module (``name``, ``before``,
    ``corrected``, ``quantized``) on the rank that quantized it, and the order
    in which every rank quantized the modules."""

    order: list[str] = field(default_factory=list)
    rows: dict[str, dict] = field(default_factory=dict)

    def merged(self, rows_by_rank: Iterable[Mapping[str, dict]]) -> list[dict]:
        """Every rank's rows, in quantization order."""
        rows = {name: row for part in rows_by_rank for name, row in part.items()}
        return [rows[name] for name in self.order if name in rows]
