"""Per-Linear calibration statistics, accumulated batch by batch.

For a Linear fed ``X~`` by the partly quantized model and ``X`` by the
full-precision one (both ``[..., d_in]`` over the same tokens), one object holds
everything QEP and GPTQ read:

- ``hessian``: ``H~ = sum 2 X~^T X~``, llm-compressor's ``accumulate_hessian``
  (float32), so that GPTQ on it is bit for bit ``GPTQModifier``'s;
- ``num_samples``: llm-compressor's count (sequences, not tokens), which
  normalises ``H~`` (and ``C``, ``G``) exactly as ``GPTQModifier`` does;
- ``tokens``: the tokens seen (an expert the router never chose has none);
- ``cross_term``: ``C = sum 2 (X - X~)^T X~`` (the correction's right-hand side);
- ``full_precision_gram``: ``G = sum 2 X^T X`` (the error report only);
- ``paired``: both streams fed the module the same tokens in every call.

All are sums over batches, so statistics of disjoint batches add up
(:meth:`LinearStatistics.add`): that is what a distributed run reduces.
Modules fed the very same input tensor (q, k and v; gate and up; experts fed
one hidden state) share one product per batch: the toolkit's accumulation into
zeros gives the increment exactly (``0 + P`` is ``P``), and adding it is
``GPTQModifier``'s own update bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

__all__ = ["LinearStatistics", "accumulate_batch", "accumulate_cross_term"]


@dataclass
class LinearStatistics:
    """What calibration learned about one Linear's inputs (see module docstring)."""

    hessian: torch.Tensor
    num_samples: torch.Tensor
    tokens: int = 0
    cross_term: torch.Tensor | None = None
    full_precision_gram: torch.Tensor | None = None
    paired: bool = True

    @classmethod
    def empty(
        cls,
        module: torch.nn.Module,
        device: torch.device | str,
        cross_term: bool = False,
        full_precision_gram: bool = False,
    ) -> "LinearStatistics":
        """Zeros for ``module``'s input width; ``cross_term`` / ``full_precision_gram``
        say whether those are kept at all."""
        hessian = make_empty_hessian(module, device=device)
        return cls(
            hessian=hessian,
            num_samples=torch.zeros((), device=device),
            cross_term=torch.zeros_like(hessian) if cross_term else None,
            full_precision_gram=torch.zeros_like(hessian) if full_precision_gram else None,
        )

    def unpair(self) -> None:
        """The streams fed this module different tokens: only ``H~`` is usable."""
        self.paired = False
        self.cross_term = None
        self.full_precision_gram = None

    def add(self, other: "LinearStatistics") -> None:
        """Add the statistics of other batches (same module), in place."""
        self.hessian += other.hessian.to(self.hessian.device)
        self.num_samples += other.num_samples.to(self.num_samples.device)
        self.tokens += other.tokens
        for name in ("cross_term", "full_precision_gram"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None:
                mine += theirs.to(mine.device)
        if not other.paired:
            self.unpair()

    def minus(self, other: "LinearStatistics") -> "LinearStatistics":
        """The statistics of the batches in ``self`` and not in ``other`` (a
        subset of them): what was fitted on when ``other`` is held out."""
        def difference(mine, theirs):
            return None if mine is None or theirs is None else mine - theirs.to(mine.device)

        return LinearStatistics(
            hessian=self.hessian - other.hessian.to(self.hessian.device),
            num_samples=self.num_samples - other.num_samples.to(self.num_samples.device),
            tokens=self.tokens - other.tokens,
            cross_term=difference(self.cross_term, other.cross_term),
            full_precision_gram=difference(self.full_precision_gram, other.full_precision_gram),
            paired=self.paired and other.paired,
        )

    def normalised(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(H~, C, G) / num_samples``, the scale GPTQ and the correction use."""
        count = self.num_samples.to(self.hessian.device)
        return (
            self.hessian / count,
            None if self.cross_term is None else self.cross_term / count,
            None
            if self.full_precision_gram is None
            else self.full_precision_gram / count,
        )


def accumulate_cross_term(
    full_precision_input: torch.Tensor,
    quantized_input: torch.Tensor,
    cross_term: torch.Tensor,
) -> torch.Tensor:
    """Add ``2 (X - X~) X~^T`` for one batch to ``cross_term`` [in, in], in place.

    Both inputs are Linear inputs ``[..., in]`` over the same tokens; the factor 2
    matches llm-compressor's ``accumulate_hessian`` so that the ratio ``C H~^-1``
    is independent of the normalisation.
    """
    if full_precision_input.shape != quantized_input.shape:
        raise ValueError(
            "full-precision and quantized inputs must cover the same tokens: got "
            f"{tuple(full_precision_input.shape)} and {tuple(quantized_input.shape)}"
        )
    width = quantized_input.shape[-1]
    quantized = quantized_input.reshape(-1, width).to(cross_term)
    difference = full_precision_input.reshape(-1, width).to(cross_term) - quantized
    cross_term.addmm_(difference.t(), quantized, alpha=2.0)
    return cross_term


def accumulate_batch(
    statistics: Mapping[torch.nn.Module, LinearStatistics],
    quantized: Mapping[torch.nn.Module, Sequence[torch.Tensor]],
    full_precision: Mapping[torch.nn.Module, Sequence[torch.Tensor]] | None = None,
) -> None:
    """Add one batch to each module's statistics, in place.

    :param statistics: the modules to update
    :param quantized: each module's ``X~``, one tensor per call in this batch
    :param full_precision: each module's ``X``, call by call (``None``: the
        quantized stream only). A module whose calls do not match in number
        and shape is unpaired.
    """
    products: dict[tuple, torch.Tensor] = {}  # one product per distinct input

    def shared(key: tuple, compute) -> torch.Tensor:
        if key not in products:
            products[key] = compute()
        return products[key]

    for module, stats in statistics.items():
        calls = list(quantized.get(module, ()))
        for inp in calls:
            stats.tokens += inp.numel() // max(1, inp.shape[-1])
            increment, count = shared(
                ("hessian", id(inp)),
                lambda inp=inp: accumulate_hessian(
                    inp,
                    module,
                    torch.zeros_like(stats.hessian),
                    torch.zeros_like(stats.num_samples),
                ),
            )
            stats.hessian += increment.to(stats.hessian.device)
            stats.num_samples += count.to(stats.num_samples.device)
        if full_precision is None or not stats.paired or (
            stats.cross_term is None and stats.full_precision_gram is None
        ):
            continue
        pairs = list(full_precision.get(module, ()))
        if len(pairs) != len(calls) or any(
            x.shape != x_q.shape for x, x_q in zip(pairs, calls)
        ):
            stats.unpair()
            continue
        for x, x_q in zip(pairs, calls):
            if stats.cross_term is not None:
                increment = shared(
                    ("cross_term", id(x), id(x_q)),  # keys: the caller's live tensors
                    lambda x=x, x_q=x_q: accumulate_cross_term(
                        x.to(x_q.device), x_q, torch.zeros_like(stats.cross_term)
                    ),
                )
                stats.cross_term += increment.to(stats.cross_term.device)
            if stats.full_precision_gram is not None:
                increment, _ = shared(
                    ("gram", id(x)),
                    lambda x=x: accumulate_hessian(
                        x,
                        module,
                        torch.zeros_like(stats.full_precision_gram),
                        torch.zeros_like(stats.num_samples),
                    ),
                )
                stats.full_precision_gram += increment.to(stats.full_precision_gram.device)
