"""The full-range symmetric grid: a signed scale per group that puts the group's
largest-magnitude weight on the extra negative level ``-2^(b-1)``.

compressed-tensors' symmetric grid divides a group's largest magnitude by
``(2^b - 1) / 2`` (3.5 at 3 bits): the level ``-2^(b-1)`` is reached only by a
weight exactly at ``-max`` and the positive side stops at ``2^(b-1) - 1`` (a
largest positive weight lands half a step past the last level). A signed scale
``s = w_extreme / -2^(b-1)`` (``max / 4`` at 3 bits, 12.5% finer) maps the
extreme weight, of either sign, onto ``-2^(b-1)`` and uses every one of the
``2^b`` levels: the codes, the zero point (none), the packing and the decode
``q * s`` stay those of the plain symmetric grid, only a scale may be negative.

:func:`full_range_scales` is the search (pure); :class:`FullRangeMSEObserver`
is it as an llm-compressor observer, registered as ``full_range_mse``::

    weights: {num_bits: 3, type: int, symmetric: true, strategy: group,
              group_size: 64, observer: full_range_mse}
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationType
from compressed_tensors.quantization.utils import calculate_qparams

from llmcompressor.observers.base import Observer

__all__ = ["FULL_RANGE_OBSERVER", "FullRangeMSEObserver", "full_range_scales"]

FULL_RANGE_OBSERVER = "full_range_mse"


def full_range_scales(
    groups: torch.Tensor, num_bits: int, maxshrink: float = 0.2, grid: float = 100.0, norm: float = 2.4
) -> torch.Tensor:
    """Each group's signed scale on the full-range grid: ``groups`` ``[..., size]``
    -> ``[...]``. Candidates ``p * e / -2^(b-1)`` and ``-p * e / -2^(b-1)`` for
    the group's extreme weight ``e`` (largest magnitude, with its sign) and each
    shrink ``p = 1 - i / grid``, ``i < maxshrink * grid`` (the toolkit's MSE
    observer's grid and norm); kept: the least ``sum |clamp(round(w / s)) s - w|^norm``
    (the first candidate on ties). An all-zero group gets ``1 / -2^(b-1)``."""
    lowest, highest = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_error = torch.full_like(extreme, float("inf"))
    best_scale = extreme / lowest
    for step in range(int(maxshrink * grid)):
        for sign in (1.0, -1.0):
            scale = sign * (1 - step / grid) * extreme / lowest
            dequantized = torch.clamp(torch.round(groups / scale), lowest, highest) * scale
            error = (dequantized - groups).abs().pow(norm).sum(-1, keepdim=True)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale.squeeze(-1)


@Observer.register(FULL_RANGE_OBSERVER)
class FullRangeMSEObserver(Observer):
    """Weight observer for the full-range symmetric integer grid
    (:func:`full_range_scales`; ``observer_kwargs``: ``maxshrink``, ``grid``,
    ``norm`` as the toolkit's ``memoryless_mse``). Symmetric integer weights
    only; the scales it returns may be negative."""

    _stats_attrs = ["signed_scales"]

    def __init__(self, base_name, args, **observer_kwargs):
        super().__init__(base_name, args, **observer_kwargs)
        if base_name != "weight" or args.type != QuantizationType.INT or not args.symmetric:
            raise ValueError(
                f"observer {FULL_RANGE_OBSERVER} is for symmetric int weights; got "
                f"{base_name} with type {args.type}, symmetric {args.symmetric} "
                "(use memoryless_mse for the others)"
            )
        kwargs = self.args.observer_kwargs
        self.search = dict(
            maxshrink=kwargs.get("maxshrink", 0.2), grid=kwargs.get("grid", 100.0), norm=kwargs.get("norm", 2.4)
        )

    def update_statistics_from_observed(self, observed: torch.Tensor) -> None:
        # observed: [1, *scale_shape, group]; one weight, one observation
        self.signed_scales = full_range_scales(observed[0], self.args.num_bits, **self.search)

    @torch.no_grad
    def get_qparams(self):
        assert self.has_statistics, "No statistics available. Call observer(value) first."
        signed = self.signed_scales
        magnitude = signed.abs() * (2**self.args.num_bits - 1) / 2
        # the toolkit's symmetric qparams for the zero points' dtype and shape
        _, zero_point = calculate_qparams(-magnitude, magnitude, self.args)
        self.delete_statistics()
        return {"scale": signed, "zero_point": zero_point, "global_scale": None}
