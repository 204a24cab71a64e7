"""Block tuning: gradient steps on a quantized layer's group scales and norm weights.

After a decoder layer's Linears are quantized, each Linear's weight is
``(codes - zero_point) * scale`` with integer codes. Block tuning holds the
codes and zero points and tunes, by Adam steps over the calibration batches,
each group's scale (as ``scale * exp(gain)``, so a scale keeps its sign) and the
layer's norm weights, so that the layer's output on the quantized stream
matches the full-precision layer's output on the full-precision stream (the
same target QEP's correction aims at, now for the whole layer with its
attention and activation functions in between). Everything it changes is
stored in the checkpoint as before: scales, norm weights; nothing to run at
serving time.

With ``block_tuning_code_learning_rate > 0`` the codes move too: each Linear
gets a latent float code per weight, started at the GPTQ sweep's codes plus
the part of the sweep's unrounded weight that rounding threw away, and the
weight during tuning is ``(rounded_codes(latent) - zero_point) * scale``,
rounded in the forward and passed straight through in the backward
(:func:`rounded_codes`). The final codes are the rounded latent, stored as
any GPTQ codes.

The pure pieces live here (tested without models): a Linear's column groups,
its integer codes, the weight from codes and tuned scales, the Adam loop, and
the checked run around it that block tuning and end-to-end tuning share
(:func:`checked_tuning`: steps in rank order, the loss on the checked batches
before and after, kept or not). The run loop runs the layer
(:meth:`qep_modifier.calibrate.CalibrationRun.tune_layer`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch

__all__ = [
    "DEFAULT_LEARNING_RATE", "NormForm", "OffGrid", "TuningOutcome", "TuningSteps", "checked_batches", "checked_tuning",
    "column_groups", "dequantized_weight", "gained", "gained_norm_parameters", "grid_codes", "is_norm", "keeps_tuning",
    "latent_codes", "linear_decay", "mean_loss", "norm_form", "rounded_codes", "scales_with_weight",
    "token_relative_error", "tune", "unrounded_codes",
]

#: ``block_tuning_learning_rate``'s default: Adam's step on the log-scale gains
#: and the norms' output gains
DEFAULT_LEARNING_RATE = 0.005


#: how far from its code a latent code starts (under half a step, so that it
#: rounds to the code whichever way ties go)
_LATENT_REACH = 0.499


class OffGrid(ValueError):
    """A weight is not ``(codes - zero_point) * scale`` with integer codes."""


def column_groups(in_features: int, scale: torch.Tensor, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Each input column's scale column: ``g_idx`` when the module has one,
    else consecutive groups of ``in_features / scale.shape[1]`` columns (one
    group per row for the channel strategy)."""
    if g_idx is not None:
        return g_idx.to(device=scale.device, dtype=torch.long)
    groups = scale.shape[1]
    if in_features % groups:
        raise OffGrid(f"{in_features} input columns do not split into {groups} groups")
    return torch.arange(in_features, device=scale.device) // (in_features // groups)


def unrounded_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """``weight / scale + zero_point`` per column's group, in float32: a weight's
    codes before rounding (on a zero scale: not finite)."""
    scale_columns = scale[:, groups].to(torch.float32)
    return weight.to(torch.float32) / scale_columns + zero_point[:, groups].to(torch.float32)


def grid_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    groups: torch.Tensor,
    tolerance: float = 0.25,
) -> torch.Tensor:
    """The integer codes of a quantized ``weight`` (as floats of the scale's
    dtype): ``weight / scale + zero_point`` per column's group, rounded. Raises
    :class:`OffGrid` when a code is more than ``tolerance`` from an integer
    (bfloat16 weights sit up to a few hundredths of a step off)."""
    codes = unrounded_codes(weight, scale, zero_point, groups)
    rounded = codes.round()
    finite = scale[:, groups] != 0
    off = ((codes - rounded).abs() * finite).max().item() if codes.numel() else 0.0
    if off > tolerance:
        raise OffGrid(f"weight is {off:.3f} of a step off its grid")
    return torch.where(finite, rounded, torch.zeros_like(rounded))


def dequantized_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """``(codes - zero_point) * scale``, each column with its group's scale and
    zero point; differentiable in ``scale``."""
    return (codes - zero_point[:, groups].to(scale.dtype)) * scale[:, groups]


class _RoundedStraightThrough(torch.autograd.Function):
    """``clamp(round(x), lowest, highest)`` forward, the identity backward."""

    @staticmethod
    def forward(ctx, latent, lowest, highest):
        return latent.round().clamp(lowest, highest)

    @staticmethod
    def backward(ctx, gradient):
        return gradient, None, None


def rounded_codes(latent: torch.Tensor, lowest: float, highest: float) -> torch.Tensor:
    """Latent float codes rounded to integers and clamped to ``[lowest,
    highest]`` (the scheme's range), with the straight-through estimator: the
    gradient passes to ``latent`` unchanged, as if there were no rounding."""
    return _RoundedStraightThrough.apply(latent, lowest, highest)


def latent_codes(codes: torch.Tensor, unrounded: torch.Tensor) -> torch.Tensor:
    """Where tuning starts a Linear's latent codes: its integer ``codes`` plus
    what rounding the sweep's ``unrounded`` codes threw away, held within half
    a step, so the rounded start is exactly ``codes`` (also where the clamp to
    the range moved a code by more than half a step); a code without a finite
    unrounded one starts at itself."""
    unrounded = torch.where(torch.isfinite(unrounded), unrounded, codes)  # a zero scale's column
    return codes + (unrounded - codes).clamp(-_LATENT_REACH, _LATENT_REACH)


def token_relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||output - target||^2 / ||target||^2`` (last
    dimension: the hidden size). Per token, because every reader of the
    residual stream first divides each token by its own RMS (the next norm):
    a plain mean squared error would be ruled by the few tokens with massive
    activations (attention sinks), whose error the next norm mostly divides
    away."""
    output, target = output.to(torch.float32), target.to(torch.float32)
    squared = (output - target).pow(2).sum(-1)
    return (squared / target.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


def tune(
    parameters: list[torch.Tensor],
    batch_losses: Callable[[], Iterable[torch.Tensor | None]],
    epochs: int,
    learning_rate: float | Sequence[float],
    share: Callable[[list[torch.Tensor], torch.Tensor | None], float] | None = None,
    decaying: tuple[Sequence[bool], int] | None = None,
) -> list[float]:
    """Adam on ``parameters``: one step per loss that ``batch_losses()`` yields,
    ``epochs`` times over. Each loss is computed only when the loop asks for it,
    so it sees the parameters after the previous step. With ``share`` (several
    processes), a process yields ``None`` for a step another one computes, and
    ``share(parameters, loss)``, called after every step's backward, leaves that
    step's gradients on every process and returns its loss. Returns each
    epoch's mean loss (measured during the epoch).

    ``learning_rate``: one rate for all, or one per parameter (each its own
    Adam parameter group). ``decaying=(flags, steps_per_epoch)``: the flagged
    parameters' rates fall linearly to 0 over the ``epochs * steps_per_epoch``
    steps (step ``k`` runs at ``rate * (1 - k / steps)``); the others keep
    theirs."""
    if epochs <= 0 or not parameters:
        return []
    if isinstance(learning_rate, (int, float)):
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    else:
        if len(learning_rate) != len(parameters):
            raise ValueError(f"{len(learning_rate)} learning rates for {len(parameters)} parameters")
        optimizer = torch.optim.Adam(
            [{"params": [parameter], "lr": rate} for parameter, rate in zip(parameters, learning_rate)]
        )
    schedule = None
    if decaying is not None:
        flags, steps_per_epoch = decaying
        if len(flags) != len(parameters):
            raise ValueError(f"{len(flags)} decay flags for {len(parameters)} parameters")
        steps = epochs * steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [partial(linear_decay, steps=steps) if flag else _constant for flag in flags],
        )
    history = []
    with torch.enable_grad():  # also under a caller's no_grad (calibration runs in one)
        for _ in range(epochs):
            total, count = 0.0, 0
            losses: Iterator[torch.Tensor | None] = iter(batch_losses())
            for loss in losses:
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                value = loss.item() if share is None else share(parameters, loss)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total, count = total + value, count + 1
            history.append(total / max(count, 1))
    return history


@dataclasses.dataclass(frozen=True)
class TuningSteps:
    """Who computes each tuning step, and which batches check the result.

    ``owners``: the rank that holds each step's batch, in step order (one
    process: all 0); ``rank``: this process; ``checked``: the indices, among
    this rank's batches, of those whose loss before and after tuning decides
    whether it is kept."""

    owners: list[int]
    rank: int
    checked: list[int]

    def work(self, epochs: int) -> int:
        """What a progress bar counts over a run of ``epochs``: every step, and
        each checked batch twice (before and after)."""
        return epochs * len(self.owners) + 2 * len(self.checked)


@dataclasses.dataclass(frozen=True)
class TuningOutcome:
    """A checked tuning run: the mean loss over every rank's checked batches
    before any step and after the last (``nan`` when a parameter ended not
    finite), and each epoch's mean loss during it."""

    start_loss: float
    final_loss: float
    history: list[float]

    @property
    def kept(self) -> bool:
        """Whether the tuned values are written back (:func:`keeps_tuning`)."""
        return bool(self.history) and keeps_tuning(self.start_loss, self.final_loss)

    def describe(self) -> str:
        """``start -> final (during each epoch: ...)``, for the log."""
        during = " -> ".join(f"{loss:.4g}" for loss in self.history)
        return f"{self.start_loss:.4g} -> {self.final_loss:.4g} (during each epoch: {during})"


def checked_tuning(
    parameters: list[torch.Tensor],
    batches: Callable[[], Iterable],
    loss: Callable[..., torch.Tensor],
    epochs: int,
    learning_rate: float | Sequence[float],
    steps: TuningSteps,
    share: Callable[[list[torch.Tensor], torch.Tensor | None, int], float],
    gather: Callable[[list[float]], list[list[float]]],
    decaying: tuple[Sequence[bool], int] | None = None,
    progress=None,
) -> TuningOutcome:
    """:func:`tune` over every rank's batches in step order, measured before and
    after on the checked batches (block tuning and end-to-end tuning alike).

    ``batches()``: this rank's batches in order (lazily); ``loss(batch)``: the
    loss on one at the current parameters. A step whose batch another rank
    holds yields ``None``; ``share(parameters, loss, owner)`` leaves that step's
    gradients on every rank and returns its loss. ``gather(values)``: every
    rank's list of values, in rank order, so the checked mean (summed exactly)
    is the same on every rank. ``progress`` (a tqdm bar, optional) counts steps
    and checked batches."""

    def checked_loss() -> float:
        with torch.no_grad():
            mine = [loss(batch).item() for position, batch in enumerate(batches()) if position in steps.checked]
        if progress is not None:
            progress.update(len(mine))
        return mean_loss([value for part in gather(mine) for value in part])

    def batch_losses():
        mine = iter(batches())
        for owner in steps.owners:
            if progress is not None:
                progress.update(1)
            if owner != steps.rank:
                yield None  # another rank's batch: its gradients come from share
                continue
            yield loss(next(mine))

    start = checked_loss()
    owners = itertools.cycle(steps.owners)
    history = tune(
        parameters,
        batch_losses,
        epochs,
        learning_rate,
        share=lambda tuned, value: share(tuned, value, next(owners)),
        decaying=decaying,
    )
    finite = all(bool(torch.isfinite(parameter).all()) for parameter in parameters)
    return TuningOutcome(start, checked_loss() if finite else math.nan, history)


def linear_decay(step: int, steps: int) -> float:
    """The factor on a decaying learning rate at ``step`` of ``steps``: 1 at
    the first, falling linearly to 0 after the last (never below)."""
    return max(0.0, 1.0 - step / steps) if steps > 0 else 1.0


def _constant(step: int) -> float:
    return 1.0


def checked_batches(count: int, most: int) -> list[int]:
    """Which of ``count`` batches (in step order) measure whether tuning helped:
    all of them up to ``most``, else ``most`` spread evenly from the first."""
    if count <= most:
        return list(range(count))
    return [index * count // most for index in range(most)]


def mean_loss(losses: Sequence[float]) -> float:
    """The mean of per-batch losses, summed exactly (``math.fsum``: the same
    value whatever the order, so on every process alike)."""
    return math.fsum(losses) / len(losses) if losses else math.nan


def keeps_tuning(start_loss: float, final_loss: float) -> bool:
    """Whether a tuned block keeps its tuning: its final loss is finite and below
    its loss before any step (:class:`TuningOutcome` makes it ``nan`` where a tuned
    parameter ended not finite). Otherwise it keeps its untuned scales and norm
    weights (a learning rate too large for the block diverges, and a ``nan`` loss
    compares below nothing)."""
    return math.isfinite(final_loss) and final_loss < start_loss


def gained(forward, gain: torch.Tensor, *args, **kwargs):
    """A norm's ``forward`` times a per-channel ``gain`` (block tuning)."""
    output = forward(*args, **kwargs)
    return output * gain.to(output.dtype)


@dataclasses.dataclass(frozen=True)
class NormForm:
    """A norm whose output is ``(weight + offset) * normalised (+ bias)``, with
    ``normalised`` independent of its parameters: then an output gain ``g`` is the
    parameter update ``weight -> (weight + offset) * g - offset``, ``bias -> bias * g``
    (:func:`gained_norm_parameters`). Llama's RMSNorm: offset 0, no bias; Gemma's
    ``(1 + weight)`` RMSNorm: offset 1; LayerNorm: offset 0 with a bias."""

    offset: float = 0.0
    bias: bool = False


def is_norm(module: torch.nn.Module) -> bool:
    """Whether block tuning looks at ``module`` as a norm: a leaf module whose
    class name says Norm (RMSNorm, LayerNorm, the toolkit's CalibrationOffsetNorm)."""
    return "norm" in type(module).__name__.lower() and next(module.children(), None) is None


def norm_form(norm: torch.nn.Module) -> NormForm | str:
    """The :class:`NormForm` of ``norm``, or why an output gain cannot stand for a
    change of its parameters (a one-line reason). Probed, not looked up by class:
    its forward runs on a shallow copy with its own parameters, with the weight set
    to 1, 2 and 3 and the bias to 0 and to a probe (linear in the weight, an offset,
    a bias that adds), so ``norm`` (offloaded or not) is never written."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "it has no per-channel weight"
    parameters = dict(norm.named_parameters(recurse=False))
    if set(parameters) - {"weight", "bias"}:
        return f"it has parameters other than weight and bias ({sorted(set(parameters) - {'weight', 'bias'})})"
    bias = parameters.get("bias")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape):
        return "its bias is not per channel"
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, weight.shape[0], generator=generator).to(device=weight.device)
    shift = torch.randn(weight.shape[0], generator=generator).to(device=weight.device)

    def output(weight_value: float, with_shift: bool = False) -> torch.Tensor:
        twin = copy.copy(norm)
        values = {"weight": torch.full_like(weight, weight_value, dtype=torch.float32)}
        if bias is not None:
            values["bias"] = shift.clone() if with_shift else torch.zeros_like(bias, dtype=torch.float32)
        object.__setattr__(
            twin, "_parameters", {key: torch.nn.Parameter(value, requires_grad=False) for key, value in values.items()}
        )
        return type(norm).forward(twin, probe).to(torch.float32)

    try:
        with torch.no_grad():
            one, two, three = output(1.0), output(2.0), output(3.0)
            shifted = output(1.0, with_shift=True) if bias is not None else None
    except Exception as error:  # noqa: BLE001 - a norm we cannot probe is not tuned
        return f"its forward cannot be probed with one input ({type(error).__name__})"
    normalised = two - one
    if not normalised.abs().max() > 0 or not torch.allclose(three - two, normalised, rtol=1e-4, atol=1e-6):
        return "its output is not linear in its weight"
    scale = float((one * normalised).sum() / normalised.pow(2).sum())  # 1 + offset
    offset = round(scale - 1.0) if abs(scale - 1.0 - round(scale - 1.0)) < 1e-4 else scale - 1.0
    if not torch.allclose(one, (1.0 + offset) * normalised, rtol=1e-4, atol=1e-6):
        return "its output is not (weight + offset) times a normalised input"
    if shifted is not None and not torch.allclose(shifted, one + shift, rtol=1e-4, atol=1e-6):
        return "its bias does not add to its output"
    return NormForm(offset=float(offset), bias=bias is not None)


def gained_norm_parameters(
    form: NormForm, weight: torch.Tensor, bias: torch.Tensor | None, gain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a norm of ``form`` whose output is its output with
    ``weight`` and ``bias`` times ``gain`` (what block tuning writes back)."""
    if form.offset == 0:
        tuned = weight * gain  # the same operations as before offsets: bit-identical for Llama
    else:
        tuned = (weight + form.offset) * gain - form.offset
    return tuned, (bias * gain if form.bias and bias is not None else None)


def scales_with_weight(norm: torch.nn.Module) -> bool:
    """Whether ``norm``'s output is its weight times something the weight does
    not change (``weight * normalised``, as Llama's RMSNorm, no offset, no bias)."""
    form = norm_form(norm)
    return isinstance(form, NormForm) and form.offset == 0 and not form.bias
