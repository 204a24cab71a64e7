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

The pure pieces live here (tested without models): a Linear's column groups,
its integer codes, the weight from codes and tuned scales, and the Adam loop.
The run loop runs the layer (:meth:`qep_modifier.calibrate.CalibrationRun.tune_layer`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "DEFAULT_LEARNING_RATE", "OffGrid", "checked_batches", "column_groups", "dequantized_weight", "gained", "grid_codes",
    "keeps_tuning", "mean_loss", "scales_with_weight", "token_relative_error", "tune",
]

#: ``block_tuning_learning_rate``'s default: Adam's step on the log-scale gains
#: and the norms' output gains
DEFAULT_LEARNING_RATE = 0.005


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
    scale_columns = scale[:, groups].to(torch.float32)
    codes = weight.to(torch.float32) / scale_columns + zero_point[:, groups].to(torch.float32)
    rounded = codes.round()
    finite = scale_columns != 0
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
    learning_rate: float,
    share: Callable[[list[torch.Tensor], torch.Tensor | None], float] | None = None,
) -> list[float]:
    """Adam on ``parameters``: one step per loss that ``batch_losses()`` yields,
    ``epochs`` times over. Each loss is computed only when the loop asks for it,
    so it sees the parameters after the previous step. With ``share`` (several
    processes), a process yields ``None`` for a step another one computes, and
    ``share(parameters, loss)``, called after every step's backward, leaves that
    step's gradients on every process and returns its loss. Returns each
    epoch's mean loss (measured during the epoch)."""
    if epochs <= 0 or not parameters:
        return []
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
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
                total, count = total + value, count + 1
            history.append(total / max(count, 1))
    return history


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


def keeps_tuning(start_loss: float, final_loss: float, parameters_finite: bool = True) -> bool:
    """Whether a tuned block keeps its tuning: its final loss is finite and below
    its loss before any step, and the tuned parameters are finite. Otherwise it
    keeps its untuned scales and norm weights (a learning rate too large for the
    block diverges, and a ``nan`` loss compares below nothing)."""
    return parameters_finite and math.isfinite(final_loss) and final_loss < start_loss


def gained(forward, gain: torch.Tensor, *args, **kwargs):
    """A norm's ``forward`` times a per-channel ``gain`` (block tuning)."""
    output = forward(*args, **kwargs)
    return output * gain.to(output.dtype)


def scales_with_weight(norm: torch.nn.Module) -> bool:
    """Whether ``norm``'s output is its weight times something the weight does
    not change (``weight * normalised``, as Llama's RMSNorm): then an output gain
    is a weight update. Gemma's ``(1 + weight) * normalised`` is not. Probed on
    a shallow copy with its own parameters, so ``norm`` (offloaded or not) is
    never written."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=torch.float32)
    twin = copy.copy(norm)
    outputs = []
    with torch.no_grad():
        for value in (1.0, 2.0):
            parameters = dict(norm.named_parameters(recurse=False))
            parameters["weight"] = torch.nn.Parameter(
                torch.full_like(weight, value, dtype=torch.float32), requires_grad=False
            )
            object.__setattr__(twin, "_parameters", parameters)
            try:
                outputs.append(type(norm).forward(twin, probe))
            except Exception:  # noqa: BLE001 - a norm we cannot probe is not tuned
                return False
    return torch.allclose(outputs[1], 2 * outputs[0], rtol=1e-4, atol=1e-6)
