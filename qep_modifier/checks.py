"""What a QEP recipe needs of the model, as checks on ``(name, module)`` pairs
whose quantization scheme is attached: the real model at ``on_initialize``, or a
meta-device copy before any weight is loaded
(:func:`qep_modifier.workflow.check_recipe_fits`). Each raises ``ValueError``
with one line naming a module and what would fit. Also what a field that
needs others needs of them (:func:`check_code_learning`), when the recipe is
parsed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from compressed_tensors.quantization import QuantizationType
from compressed_tensors.utils import getattr_chain
from loguru import logger

from qep_modifier.distributed import gather, rank
from qep_modifier.full_range import FULL_RANGE_OBSERVER

__all__ = [
    "NonFiniteWeights",
    "WEIGHT_BITS",
    "check_calibration_size",
    "check_code_learning",
    "check_finite_weights",
    "check_group_sizes",
    "check_modules",
    "check_observer_name",
    "check_scheme",
    "check_targets_match",
    "quantizes_weight",
]

#: the integer widths QEP quantizes weights to (what vLLM's WNA16 kernels serve)
WEIGHT_BITS = range(2, 9)


class NonFiniteWeights(ValueError):
    """A targeted module of the input model holds ``nan`` or ``inf``."""

NamedModules = Iterable[tuple[str, torch.nn.Module]]


def check_modules(
    named_modules: NamedModules,
    *,
    owner: str = "QEPModifier",
    refit_scales: int = 0,
    block_tuning_epochs: int = 0,
    end_to_end_epochs: int = 0,
) -> None:
    """Every model check of a recipe with these fields (``owner``: the
    modifier's name, for the messages): each module's attached scheme
    (:func:`check_scheme`), then the group sizes against the input widths."""
    named_modules = list(named_modules)
    for name, module in named_modules:
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            check_scheme(name, scheme, owner, refit_scales, block_tuning_epochs, end_to_end_epochs)
    check_group_sizes(named_modules, owner)


def check_sweep_on_observer_scales(
    base: str, group_scales: str, for_base: str, for_group_scales: str
) -> None:
    """What a field built on the GPTQ sweep over the observer's scales needs
    (``refit_scales``, ``block_tuning_code_learning_rate``): ``base: gptq`` and
    ``group_scales: observer``. ``for_base`` / ``for_group_scales`` open the
    line: the field and why it needs each."""
    if base != "gptq":
        raise ValueError(f"{for_base}: it needs base: gptq, got base: {base}")
    if group_scales != "observer":
        raise ValueError(
            f"{for_group_scales}: it needs group_scales: observer, got group_scales: {group_scales}"
        )


def check_code_learning(rate: float, block_tuning_epochs: int, base: str, group_scales: str) -> None:
    """What ``block_tuning_code_learning_rate > 0`` needs: block tuning, and the
    GPTQ sweep on the observer's scales (whose unrounded weights the latent
    codes start from)."""
    if not rate > 0:
        return
    if block_tuning_epochs < 1:
        raise ValueError(
            f"block_tuning_code_learning_rate: {rate} moves the codes during block tuning: "
            f"it needs block_tuning_epochs >= 1, got block_tuning_epochs: {block_tuning_epochs}"
        )
    check_sweep_on_observer_scales(
        base,
        group_scales,
        f"block_tuning_code_learning_rate: {rate} starts the codes from the GPTQ sweep's "
        "unrounded weights",
        f"block_tuning_code_learning_rate: {rate} starts the codes from the sweep on the "
        "observer's scales",
    )


def check_targets_match(
    named_modules: NamedModules,
    targets,
    ignore,
    owner: str = "QEPModifier",
    model: torch.nn.Module | None = None,
) -> None:
    """Raise one line naming ``targets`` and ``ignore`` when the ``(name, module)``
    pairs they matched (in the real model, or a meta-device copy before any load)
    hold no weight to quantize; with ``model``, name one of its Linears."""
    if any(quantizes_weight(module) for _, module in named_modules):
        return
    conv1d = next(
        (name for name, module in (model.named_modules() if model is not None else ())
         if type(module).__name__ == "Conv1D"),
        None,
    )
    if conv1d is not None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{owner}: model type {model_type} keeps its projections in transformers "
            f"Conv1D modules (like {conv1d}), which targets {sorted(targets)} do not match "
            "and compressed-tensors does not quantize (only Linear): no QEP recipe runs on "
            "it; use a model whose projections are Linear (README, families)"
        )
    example = next(
        (name for name, module in (model.named_modules() if model is not None else ())
         if isinstance(module, torch.nn.Linear)),
        None,
    )
    seen = f"; its Linears are named like {example}" if example else ""
    raise ValueError(
        f"{owner}: targets {sorted(targets)} with ignore {list(ignore)} match no module "
        f"of the model with a weight to quantize{seen}; targets take class names "
        "(Linear) or re: patterns of module names"
    )


def check_finite_weights(named_modules: NamedModules) -> None:
    """Raise one line naming the first module with a ``nan`` or ``inf`` in its
    weight or bias (scales, corrections and the error report would all be
    ``nan`` after it). Meta tensors (a skeleton before any load) are skipped."""
    for name, module in named_modules:
        for kind in ("weight", "bias"):  # not the (still empty) quantization parameters
            parameter = getattr(module, kind, None)
            if (
                not isinstance(parameter, torch.Tensor)
                or not parameter.is_floating_point()
                or parameter.is_meta
            ):
                continue
            count = int((~torch.isfinite(parameter.detach())).sum())
            if count:
                raise NonFiniteWeights(
                    f"module {name} has {count} non-finite {kind} value"
                    f"{'s' if count > 1 else ''} (nan/inf); fix the model before quantizing"
                )


def check_scheme(
    where: str, scheme, owner: str, refit_scales: int, block_tuning_epochs: int, end_to_end_epochs: int = 0
) -> None:
    """Raise one line when ``scheme`` (one resolved config group, named by
    ``where``) is not what QEP quantizes with: weight-only, int, 2 to 8 bits,
    symmetric with the full-range observer, and group or channel scales where
    refits or block tuning need them."""
    if scheme.input_activations is not None or scheme.output_activations is not None:
        raise ValueError(
            f"{owner} is weight-only: {where} quantizes activations too; use a "
            "weight-only scheme (W4A16, W3A16, W2A16, W4A16_ASYM or "
            "config_groups with only `weights`)"
        )
    weights = scheme.weights
    if weights is None:
        raise ValueError(f"{owner} quantizes weights: {where} has no `weights`")
    if weights.type != QuantizationType.INT:
        raise ValueError(
            f"{owner} quantizes to integers only: {where} has weight type "
            f"{_value(weights.type)!r}; allowed: 'int'"
        )
    if getattr(weights, "num_bits", None) not in WEIGHT_BITS:
        raise ValueError(
            f"{where}: weights num_bits = {weights.num_bits} is outside 2-8 "
            f"({owner} quantizes weights to 2- to 8-bit integers)"
        )
    if getattr(weights, "observer", None) == FULL_RANGE_OBSERVER and not weights.symmetric:
        raise ValueError(
            f"{where}: observer {FULL_RANGE_OBSERVER!r} is the full-range symmetric grid, "
            "but the weights are asymmetric; use symmetric: true, or memoryless_mse"
        )
    for count, needs in (
        (refit_scales, "refit_scales needs the group or channel strategy"),
        (block_tuning_epochs, "block_tuning_epochs tunes group or channel scales"),
        (end_to_end_epochs, "end_to_end_epochs tunes group or channel scales"),
    ):
        if count and weights.strategy not in ("group", "channel"):
            raise ValueError(f"{needs}: {where} has strategy {_value(weights.strategy)!r}")


def check_end_to_end_model(model: torch.nn.Module, calibration) -> torch.nn.Module:
    """What ``end_to_end_epochs`` needs: calibration data and an output embedding
    that is a Linear (the logits it compares come from it). Returns the output
    embedding; raises one line otherwise."""
    if calibration is None:
        raise ValueError("end_to_end_epochs needs calibration data (oneshot's dataset), and none was given")
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"end_to_end_epochs compares the model's output distributions through its output embedding, "
            f"and {type(model).__name__} has none that is a Linear (got {type(head).__name__}); "
            "use end_to_end_epochs: 0"
        )
    return head


def check_observer_name(where: str, name: str | None, weight_observer: str | None = None) -> None:
    """Raise one line when no observer is registered under ``name`` (the
    observer of the scheme ``where``; named ``weight_observer`` when that field
    set it)."""
    field = "weight_observer" if weight_observer == name else f"{where} weights observer"
    import difflib

    from llmcompressor.observers import Observer

    if name is None:
        return
    try:
        Observer.get_value_from_registry(name)
    except KeyError:
        known = [known.replace("-", "_") for known in Observer.registered_names()]
        close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{field}: no observer named {name!r}{hint}; observers: {', '.join(known)}"
        ) from None


def _value(value):
    return getattr(value, "value", value)


def quantizes_weight(module: torch.nn.Module) -> bool:
    """A target whose weight QEP quantizes (embeddings are left out)."""
    return getattr_chain(
        module, "quantization_scheme.weights", None
    ) is not None and not isinstance(module, torch.nn.Embedding)


def check_group_sizes(named_modules: NamedModules, owner: str = "QEPModifier") -> None:
    """Raise one line naming the group sizes and input widths that do not fit
    (and what would). The toolkit's own divisibility check lists every module;
    this one also catches modules narrower than a group, which it lets through."""
    misfits: dict[tuple[int, int], list[str]] = {}
    widths = set()
    for name, module in named_modules:
        weights = getattr_chain(module, "quantization_scheme.weights", None)
        group_size = getattr(weights, "group_size", None)
        if weights is None or weights.strategy != "group" or not group_size:
            continue
        width = module.weight.shape[1]
        widths.add(width)
        if width % group_size:
            misfits.setdefault((group_size, width), []).append(name)
    if not misfits:
        return
    described = "; ".join(
        f"group_size {group_size} does not divide the input width {width} of "
        f"{len(names)} module(s), e.g. {names[0]}"
        for (group_size, width), names in misfits.items()
    )
    fitting = [size for size in (32, 64, 128, 256) if all(w % size == 0 for w in widths)]
    raise ValueError(
        f"{owner}: {described}; group sizes that fit every targeted "
        f"module: {', '.join(map(str, fitting)) or 'none of 32/64/128/256'}; or use "
        "strategy: channel, or add the modules to `ignore`"
    )


def calibration_tokens(calibration) -> int:
    """Tokens in a calibration set of ``input_ids`` / ``attention_mask`` batches."""
    tokens = 0
    for batch in calibration:
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if mask is not None:
            tokens += int(torch.as_tensor(mask).sum())
        elif ids is not None:
            tokens += torch.as_tensor(ids).numel()
    return tokens


def check_calibration_size(calibration, widest_input: int) -> None:
    """Refuse an empty calibration set (on any rank); warn when all ranks hold
    fewer tokens than the widest target input (``H~`` is then rank-deficient)."""
    if calibration is None:
        return
    per_rank = gather(calibration_tokens(calibration))  # every rank decides on the same numbers
    if 0 in per_rank:
        where = "" if len(per_rank) == 1 else f" on rank {per_rank.index(0)}"
        raise ValueError(f"QEPModifier needs calibration data: the calibration set is empty{where}")
    tokens = sum(per_rank)
    if tokens < widest_input and rank() == 0:
        logger.warning(
            f"QEP: the calibration set has {tokens} tokens, fewer than the widest "
            f"target input ({widest_input}): H~ is rank-deficient and the damping "
            "(dampening_frac, correction_damping) dominates; use more samples"
        )
