"""GPTQ column sweep with FOEM's first-order error term.

This module holds pure tensor functions (no modifier code).  The entry point,
:func:`quantize_weight_first_order`, has the same inputs, outputs and in-place
semantics as llm-compressor's
``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight`` and adds FOEM
("First-Order Error Matters: Accurate Compensation for Quantized Large Language
Models", Zheng et al., arXiv:2507.11017).  It reuses the toolkit's helpers
(``apply_activation_ordering``, ``factorize_hessian``, ``column_scale_window``,
``fake_quantize``, ``GPTQ_PRECISION``) and always runs the eager column loop
written here (never the toolkit's Triton block kernel).
:func:`refit_group_scales` refits a sweep's scales to the codes it chose.

With ``first_order_strength == 0`` the function performs exactly the same
floating-point operations, in the same order, as the eager path of
``quantize_weight`` and therefore reproduces it bit for bit on CPU.

Derivation
----------
Work on one output row ``w`` (all rows are independent and share ``H``).  Let
``w0`` be the weights at the start of the sweep (after activation ordering and
after dead columns are zeroed), ``F`` the set of columns not yet quantized and
``q`` the column being quantized.  GPTQ/OBS minimise the second-order model of
the layer loss around the current latent weights ``w``::

    dL(d) = g_F . d_F + 1/2 d_F^T H_FF d_F     s.t.  d_q = Q(w_q) - w_q

and assume ``g = 0``.  But the compensation updates move ``w`` away from
``w0``, so the gradient of ``||(w - w0) X||^2`` is ``(w - w0) H``, not zero.
FOEM keeps the first-order term and approximates it as
``g_F = beta (w - w0)_F H_FF``.  The Lagrangian solution of the constrained
problem is::

    d_F = -H_FF^{-1} g_F - lambda H_FF^{-1} e_q,
    lambda = ((w_q - Q(w_q)) - [H_FF^{-1} g_F]_q) / [H_FF^{-1}]_qq

and with ``H_FF^{-1} g_F = beta (w - w0)_F`` the Hessian cancels::

    d_F = -beta (w - w0)_F - err_q [H_FF^{-1}]_{q,:} / [H_FF^{-1}]_qq
    err_q = ((w_q - Q(w_q)) - beta (w_q - w0_q)) / [H_FF^{-1}]_qq

GPTQ's upper Cholesky factor ``U`` of ``H^{-1}`` (``Hinv`` in the toolkit)
gives ``[H_FF^{-1}]_{q,:} / [H_FF^{-1}]_qq = U_{q,F} / U_qq`` and
``[H_FF^{-1}]_qq = U_qq^2``, so, per quantized column ``q``::

    err_q   = ((w_q - Q(w_q)) - beta (w_q - w0_q)) / U_qq
    w_{q+1:} <- w_{q+1:} - err_q U_{q,q+1:} - beta (w_{q+1:} - w0_{q+1:})

where ``w`` on the right-hand side is the latent row *before* this update
(``d_q`` equals ``Q(w_q) - w_q`` exactly, so column ``q`` lands on ``Q(w_q)``).
``beta`` is ``first_order_strength`` (the paper uses 0.1); ``beta = 0`` is GPTQ.

Which columns the pull reaches (``first_order_reach``)
------------------------------------------------------
* ``"all"`` (the derivation above taken literally): quantizing column ``q`` pulls
  every remaining column ``j > q`` by ``-beta (w_j - w0_j)``, with ``w_j`` the
  value before column ``q``'s update.
* ``"next"`` (default): quantizing column ``q`` pulls only column ``q + 1`` (in sweep
  order, i.e. after activation ordering) by ``-beta (w_{q+1} - w0_{q+1})``,
  again using the value before column ``q``'s update.  The error term
  ``err_q`` is the same in both modes.

In both modes the first column gets no pull (nothing has moved yet) and the
pull crosses block boundaries exactly as in an unblocked sweep.

Note on ``"all"``: the pull compounds.  A column ``k`` places downstream has
its accumulated GPTQ compensation damped by ``(1 - beta)^k`` before it is
quantized (``0.9^50 ~ 0.005``), so for wide layers most of GPTQ's
compensation is undone and the result moves towards round-to-nearest.
``"next"`` pulls every column exactly once, just before it is quantized, as
the authors' public code does; it is the default because ``"all"`` measured
close to round-to-nearest (synthetic 256x512 layer, 3-bit g128, error
tr(dW H dW^T): GPTQ 33.1k, "next" 34.2k, "all" 84.8k, RTN 86.8k).

Blocking (lazy batch updates)
-----------------------------
Within a block the update above is applied column by column.  Columns after
the block are updated once per block: writing ``D = W - W0`` for those
columns, ``b`` for the block width and ``k = 0..b-1`` for the block's columns,
the unblocked sweep gives

* ``"all"``:  ``D <- (1 - beta)^b D - sum_k (1 - beta)^(b-1-k) err_k U_{k,:}``
* ``"next"``: ``W <- W - sum_k err_k U_{k,:}`` and additionally the first column
  after the block gets ``-beta (v - w0)`` with ``v`` its value before the last
  block column's update (``v = W - sum_{k<b-1} err_k U_k``).

so a blocked sweep equals the unblocked one up to floating-point rounding.

Loss booking
------------
GPTQ books, per row, ``sum_q err_q^2 / 2`` with ``err_q = (w_q - Q(w_q)) / U_qq``.
Here the same formula is applied to the FOEM error term
``err_q = ((w_q - Q(w_q)) - beta (w_q - w0_q)) / U_qq`` (the value that is
propagated); the returned per-batch loss is the sum over rows.  With
``beta = 0`` this is exactly GPTQ's loss.
"""

from __future__ import annotations

import math
from copy import copy

import torch
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationArgs,
    QuantizationStrategy,
    fake_quantize,
)
from llmcompressor.modifiers.gptq.helpers import (
    GPTQ_PRECISION,
    apply_activation_ordering,
    column_scale_window,
    factorize_hessian,
)

__all__ = [
    "FIRST_ORDER_REACHES",
    "group_aware_order",
    "quantize_weight_first_order",
    "quantize_weight_group_scales",
    "refit_group_scales",
    "validate_first_order_args",
]

#: Allowed values of ``first_order_reach``.
FIRST_ORDER_REACHES = ("all", "next")


def validate_first_order_args(
    first_order_strength: float, first_order_reach: str
) -> tuple[float, str]:
    """Check the FOEM arguments and return them normalised.

    :param first_order_strength: FOEM ``beta``; a finite number >= 0
    :param first_order_reach: which columns the first-order pull reaches,
        one of :data:`FIRST_ORDER_REACHES`
    :raises ValueError: naming the offending argument and its allowed values
    :return: ``(float(first_order_strength), first_order_reach)``
    """
    if isinstance(first_order_strength, bool) or not isinstance(
        first_order_strength, (int, float)
    ):
        raise ValueError(
            "first_order_strength must be a finite real number >= 0, got "
            f"{first_order_strength!r}"
        )
    strength = float(first_order_strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(
            "first_order_strength must be a finite real number >= 0, got "
            f"{first_order_strength!r}"
        )
    if not isinstance(first_order_reach, str) or (
        first_order_reach not in FIRST_ORDER_REACHES
    ):
        raise ValueError(
            f"first_order_reach must be one of {FIRST_ORDER_REACHES}, got "
            f"{first_order_reach!r}"
        )
    return strength, first_order_reach


def quantize_weight_first_order(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
    quant_args: QuantizationArgs,
    blocksize: int = 128,
    percdamp: float = 0.01,
    first_order_strength: float = 0.0,
    first_order_reach: str = "next",
    unrounded: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Quantize a batch of weights with GPTQ plus FOEM's first-order term.

    Same contract as ``llmcompressor``'s ``quantize_weight``: FP32 ``weights``
    and ``hessians`` are used as working buffers and are overwritten.  The
    observer ``scale``/``zero_point`` stay fixed through the sweep.  See the
    module docstring for the math, the reach of the pull and the loss booking.

    :param weights: weights with shape [batch, rows, columns]
    :param hessians: normalized Hessians with shape [batch, columns, columns]
    :param scale: stacked observer scales
    :param zero_point: stacked observer zero points
    :param global_scale: optional stacked observer global scales
    :param quant_args: quantization arguments used to find quantization parameters
    :param blocksize: chunk size of quantization updates
    :param percdamp: dampening factor on hessian diagonal
    :param first_order_strength: FOEM ``beta`` (>= 0); 0 reproduces GPTQ exactly
    :param first_order_reach: ``"all"`` (pull every remaining column) or
        ``"next"`` (pull only the next column in sweep order)
    :param unrounded: when given (``[batch, rows, columns]``), filled with each
        column's weight just before it is rounded (after the updates of the
        columns swept before it), in the original column order; nothing else
        changes
    :return: quantized weights, per-batch losses, and RTN fallback flags
    """
    beta, reach = validate_first_order_args(first_order_strength, first_order_reach)
    if weights.ndim != 3 or hessians.ndim != 3:
        raise ValueError("weights and hessians must have shape [batch, ...]")
    if weights.shape[0] != hessians.shape[0]:
        raise ValueError("weights and hessians must have matching batch sizes")
    if blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")

    batch_size, num_rows, num_columns = weights.shape
    strategy = quant_args.strategy
    actorder = quant_args.actorder
    final_dtype = weights.dtype
    device = weights.device
    W = weights.to(device=device, dtype=GPTQ_PRECISION)
    H = hessians.to(device=device, dtype=GPTQ_PRECISION)
    del weights, hessians
    scale = scale.to(device=device)
    zero_point = zero_point.to(device=device)
    if global_scale is not None:
        global_scale = global_scale.to(device=device)

    W, H, perm = apply_activation_ordering(W, H, actorder)

    # mapping from (sweep-order) column index to group index
    g_idx = None
    if strategy in (
        QuantizationStrategy.GROUP,
        QuantizationStrategy.TENSOR_GROUP,
        QuantizationStrategy.BLOCK,
    ):
        divisor = (
            quant_args.group_size
            if strategy != QuantizationStrategy.BLOCK
            else quant_args.block_structure[1]
        )
        g_idx = torch.arange(num_columns, device=device, dtype=torch.int) // divisor
        if actorder == ActivationOrdering.WEIGHT:
            g_idx = torch.gather(g_idx.unsqueeze(0).expand(batch_size, -1), 1, perm)

    losses = torch.zeros(batch_size, num_rows, device=device)
    used_rtn_fallback = torch.zeros(batch_size, dtype=torch.bool, device=device)
    # zeroes dead columns of W in place and turns H into U (upper Cholesky of H^-1)
    Hinv = factorize_hessian(W, H, percdamp, used_rtn_fallback)

    # W0: the weights at the start of the sweep, in sweep (permuted) order and
    # with dead columns already zeroed, so dead columns never get pulled.
    W0 = W.clone() if beta != 0 else None
    # each column before its rounding, in sweep order (only when asked for)
    before_rounding = torch.empty_like(W) if unrounded is not None else None

    for i1, i2, W1, Q1, Err1, Hinv1 in _column_blocks(W, Hinv, blocksize):
        losses1 = torch.zeros_like(W1)

        _first_order_block_update(
            W1,
            None if W0 is None else W0[:, :, i1:i2],
            Hinv1,
            Q1,
            Err1,
            losses1,
            scale=scale,
            zero_point=zero_point,
            global_scale=global_scale,
            g_idx=g_idx,
            quant_args=quant_args,
            i1=i1,
            beta=beta,
            reach=reach,
            unrounded1=None if before_rounding is None else before_rounding[:, :, i1:i2],
        )

        W[:, :, i1:i2] = Q1
        losses += torch.sum(losses1, 2) / 2

        if i2 < num_columns:
            _tail_update(W, W0, Err1, Hinv, i1, i2, beta, reach)

    if perm is not None:
        invperm = torch.argsort(perm, dim=-1)
        W = torch.gather(W, -1, invperm.unsqueeze(-2).expand(-1, num_rows, -1))
        if before_rounding is not None:
            before_rounding = torch.gather(
                before_rounding, -1, invperm.unsqueeze(-2).expand(-1, num_rows, -1)
            )
    if unrounded is not None:
        unrounded.copy_(before_rounding)

    return W.to(final_dtype), losses.sum(dim=1), used_rtn_fallback


def _column_blocks(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int):
    """GPTQ's lazy-batch blocks, one at a time (``W`` is read when the block is
    reached, after the updates of the blocks before): ``i1``, ``i2``, a copy of
    the block's weights, zeroed quantized and error buffers, the block of Hinv."""
    num_columns = W.shape[-1]
    for i1 in range(0, num_columns, blocksize):
        i2 = min(i1 + blocksize, num_columns)
        W1 = W[:, :, i1:i2].clone()
        yield i1, i2, W1, torch.zeros_like(W1), torch.zeros_like(W1), Hinv[:, i1:i2, i1:i2]


def _first_order_block_update(
    W1: torch.Tensor,
    W01: torch.Tensor | None,
    Hinv1: torch.Tensor,
    Q1: torch.Tensor,
    Err1: torch.Tensor,
    losses1: torch.Tensor,
    *,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    quant_args: QuantizationArgs,
    i1: int,
    beta: float,
    reach: str,
    unrounded1: torch.Tensor | None = None,
) -> None:
    """Eager column loop over one block, updating the block tensors in place.

    ``W01`` is the block's slice of the start-of-sweep weights (``None`` when
    ``beta == 0``, in which case the loop is operation-for-operation the
    toolkit's eager GPTQ block update). ``unrounded1``, when given, gets each
    column as it is just before its rounding.
    """
    block_width = W1.shape[-1]
    # column_scale_window already expands group/tensor qparams per column, so
    # every column is fake-quantized as a per-channel tensor
    altered_qargs = copy(quant_args)
    altered_qargs.strategy = QuantizationStrategy.CHANNEL
    eff, zp = column_scale_window(
        scale,
        zero_point,
        global_scale,
        g_idx,
        quant_args,
        num_rows=W1.shape[-2],
        i1=i1,
        i2=i1 + block_width,
    )
    for i in range(block_width):
        w = W1[:, :, i]
        if unrounded1 is not None:
            unrounded1[:, :, i] = w
        # batch folded into the channel dimension: one QDQ call per column
        q = fake_quantize(
            w.transpose(0, 1),
            eff[:, :, i].transpose(0, 1),
            None if zp is None else zp[:, :, i].transpose(0, 1),
            altered_qargs,
        ).transpose(0, 1)

        error = _column_step(W1, W01, Hinv1, Q1, Err1, i, q, beta, reach)
        losses1[:, :, i] = error.square()


def _column_step(
    W1: torch.Tensor,
    W01: torch.Tensor | None,
    Hinv1: torch.Tensor,
    Q1: torch.Tensor,
    Err1: torch.Tensor,
    i: int,
    q: torch.Tensor,
    beta: float,
    reach: str,
) -> torch.Tensor:
    """Quantize block column ``i`` to ``q`` and compensate the block's later
    columns, in place; returns the propagated error ``err_i`` (module docstring).

    ``W01`` is the block's slice of the start-of-sweep weights (``None`` when
    ``beta == 0``: then this is operation for operation the toolkit's eager GPTQ
    column update). The pull uses the values before this column's error update.
    """
    w = W1[:, :, i]
    diagonal = Hinv1[:, i, i]
    if W01 is None:
        error = (w - q) / diagonal[:, None]
    else:
        error = ((w - q) - beta * (w - W01[:, :, i])) / diagonal[:, None]
    Q1[:, :, i] = q
    Err1[:, :, i] = error
    if W01 is None:
        W1[:, :, i:] -= error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
        return error
    if i + 1 >= W1.shape[-1]:
        return error
    if reach == "all":
        pull = beta * (W1[:, :, i + 1 :] - W01[:, :, i + 1 :])
    else:
        pull = beta * (W1[:, :, i + 1] - W01[:, :, i + 1])
    W1[:, :, i + 1 :] -= error.unsqueeze(-1) * Hinv1[:, i, i + 1 :].unsqueeze(1)
    if reach == "all":
        W1[:, :, i + 1 :] -= pull
    else:
        W1[:, :, i + 1] -= pull
    return error


def _tail_update(
    W: torch.Tensor,
    W0: torch.Tensor | None,
    Err1: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i2: int,
    beta: float,
    reach: str,
) -> None:
    """The lazy update of the columns after block ``[i1, i2)``, in place
    (module docstring, "Blocking")."""
    width = i2 - i1
    if W0 is None:
        # plain GPTQ lazy update, identical to quantize_weight
        w_err = torch.bmm(Err1, Hinv[:, i1:i2, i2:])
        W[:, :, i2:] -= w_err
    elif reach == "all":
        # D <- (1-beta)^b D - sum_k (1-beta)^(b-1-k) err_k U_k
        decay = torch.pow(
            torch.tensor(1.0 - beta, dtype=torch.float64),
            torch.arange(width - 1, -1, -1, dtype=torch.float64),
        ).to(device=W.device, dtype=GPTQ_PRECISION)
        tail_decay = (1.0 - beta) ** width
        W0_tail = W0[:, :, i2:]
        w_err = torch.bmm(Err1 * decay, Hinv[:, i1:i2, i2:])
        W[:, :, i2:] = W0_tail + tail_decay * (W[:, :, i2:] - W0_tail) - w_err
    else:  # reach == "next"
        # value of the first column after the block just before the last
        # block column's update: that is what the pull acts on
        before_last = W[:, :, i2] - torch.bmm(
            Err1[:, :, : width - 1], Hinv[:, i1 : i2 - 1, i2 : i2 + 1]
        ).squeeze(-1)
        w_err = torch.bmm(Err1, Hinv[:, i1:i2, i2:])
        W[:, :, i2:] -= w_err
        W[:, :, i2] -= beta * (before_last - W0[:, :, i2])


def group_aware_order(hessian_diagonals: torch.Tensor, group_size: int) -> torch.Tensor:
    """A sweep order that keeps each quantization group's columns together:
    groups by descending summed ``diag(H)``, columns within a group by
    descending ``diag(H)``. ``[batch, columns]`` -> permutation ``[batch, columns]``.

    The stored weight keeps its column order and one scale per original group, so
    no ``g_idx`` is needed to serve it (unlike reordering columns across groups).
    """
    batch, columns = hessian_diagonals.shape
    groups = columns // group_size
    by_group = hessian_diagonals.reshape(batch, groups, group_size)
    group_rank = torch.argsort(by_group.sum(-1), dim=-1, descending=True)  # [batch, groups]
    within = torch.argsort(by_group, dim=-1, descending=True)  # [batch, groups, gs]
    ordered = torch.gather(within, 1, group_rank.unsqueeze(-1).expand(-1, -1, group_size))
    offsets = (group_rank * group_size).unsqueeze(-1)
    return (ordered + offsets).reshape(batch, columns)


def quantize_weight_group_scales(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    quant_args: QuantizationArgs,
    group_qparams,
    blocksize: int = 128,
    percdamp: float = 0.01,
    first_order_strength: float = 0.0,
    first_order_reach: str = "next",
    group_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ sweep (with FOEM's term when ``first_order_strength > 0``) that
    chooses each group's scale when it reaches the group, from the group's
    weights as the sweep has compensated them so far, as the original GPTQ does
    without static groups. Group strategy only.

    :param group_qparams: ``(item, weights [rows, group_size]) -> (scale, zero_point)``,
        each ``[rows, 1]``: the observer of batch item ``item``
    :param group_order: visit groups in :func:`group_aware_order`; otherwise in
        column order
    :return: quantized weights, per-item losses, RTN fallback flags, and the
        scales and zero points ``[batch, rows, groups]`` in original group order
    """
    beta, reach = validate_first_order_args(first_order_strength, first_order_reach)
    if quant_args.strategy != QuantizationStrategy.GROUP or not quant_args.group_size:
        raise ValueError("quantize_weight_group_scales needs the group strategy")
    batch_size, num_rows, num_columns = weights.shape
    group_size = quant_args.group_size
    if num_columns % group_size:
        raise ValueError(f"group_size {group_size} does not divide {num_columns} columns")
    blocksize = max(group_size, blocksize - blocksize % group_size)
    final_dtype, device = weights.dtype, weights.device
    W = weights.to(dtype=GPTQ_PRECISION)
    H = hessians.to(dtype=GPTQ_PRECISION)

    perm = None
    if group_order:
        perm = group_aware_order(torch.diagonal(H, dim1=-2, dim2=-1), group_size)
        W = torch.gather(W, -1, perm.unsqueeze(-2).expand(-1, num_rows, -1))
        H = torch.gather(H, -1, perm.unsqueeze(-2).expand(-1, num_columns, -1))
        H = torch.gather(H, -2, perm.unsqueeze(-1).expand(-1, -1, num_columns))
    # original group of each group in sweep order
    sweep_groups = (
        (perm[:, ::group_size] // group_size)
        if perm is not None
        else torch.arange(num_columns // group_size, device=device).expand(batch_size, -1)
    )

    losses = torch.zeros(batch_size, num_rows, device=device)
    used_rtn_fallback = torch.zeros(batch_size, dtype=torch.bool, device=device)
    Hinv = factorize_hessian(W, H, percdamp, used_rtn_fallback)
    W0 = W.clone() if beta != 0 else None
    groups = num_columns // group_size
    scales = torch.zeros(batch_size, num_rows, groups, device=device)
    zero_points = None
    channel_args = copy(quant_args)
    channel_args.strategy = QuantizationStrategy.CHANNEL

    for i1, i2, W1, Q1, Err1, Hinv1 in _column_blocks(W, Hinv, blocksize):
        width = i2 - i1
        W01 = None if W0 is None else W0[:, :, i1:i2]
        eff = zp = None
        for i in range(width):
            column = i1 + i
            if column % group_size == 0:  # a new group: its scale from its weights now
                eff, zp = [], []
                for item in range(batch_size):
                    scale, zero = group_qparams(item, W1[item, :, i : i + group_size])
                    original = int(sweep_groups[item, column // group_size])
                    scales[item, :, original] = scale.reshape(-1).to(scales.dtype)
                    if zero is not None:
                        if zero_points is None:
                            zero_points = torch.zeros(
                                batch_size, num_rows, groups, device=device, dtype=zero.dtype
                            )
                        zero_points[item, :, original] = zero.reshape(-1)
                    eff.append(scale.reshape(-1))
                    zp.append(None if zero is None else zero.reshape(-1))
                eff = torch.stack(eff).to(device)  # [batch, rows]
                zp = None if zp[0] is None else torch.stack(zp).to(device)
            w = W1[:, :, i]
            q = fake_quantize(
                w.transpose(0, 1), eff.transpose(0, 1),
                None if zp is None else zp.transpose(0, 1), channel_args,
            ).transpose(0, 1)
            error = _column_step(W1, W01, Hinv1, Q1, Err1, i, q, beta, reach)
            losses += error.square() / 2
        W[:, :, i1:i2] = Q1
        if i2 < num_columns:
            _tail_update(W, W0, Err1, Hinv, i1, i2, beta, reach)

    if perm is not None:
        inverse = torch.argsort(perm, dim=-1)
        W = torch.gather(W, -1, inverse.unsqueeze(-2).expand(-1, num_rows, -1))
    return W.to(final_dtype), losses.sum(dim=1), used_rtn_fallback, scales, zero_points


def refit_group_scales(
    quantized: torch.Tensor,
    target: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    percdamp: float = 0.01,
    storage_dtype: torch.dtype = torch.float32,
    max_elements: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refit each group's scale to the integer codes a sweep chose.

    The sweep fixes every weight's code ``c = q - z`` (integer, ``z`` the zero
    point) with the scales the observer chose before it. With the codes and zero
    points held, the quantized row ``s * c`` is linear in the row's scales, so
    the scales that minimise the layer's output error against the target row
    ``t`` (the weight the sweep started from) are the solution of a small linear
    system per row. With ``A`` the ``[columns, groups]`` matrix holding ``c`` in
    each column's group and ``H`` the Hessian with the sweep's damping
    (``percdamp * mean(diag H)`` added to its diagonal)::

        minimise (t - A s) H (t - A s)^T
        (A^T H A + rho I) (s - s0) = A^T H (t - A s0)

    ``rho`` (``1e-6`` of the mean of ``diag(A^T H A)``) keeps groups whose codes
    are all zero at their old scale ``s0``. A row keeps its old scales when a new
    one is not finite or is zero or of the other sign than the old one (the
    full-range grid's scales may be negative), or when the new ones do not lower the
    row's error. New scales are rounded to ``storage_dtype`` (the dtype the
    checkpoint stores them in) before the weights are rebuilt and compared.

    :param quantized: the sweep's output ``[batch, rows, columns]``, on the grid
        of ``scale`` / ``zero_point``, columns in stored order
    :param target: the weights the sweep started from, same shape
    :param hessians: the (undamped) Hessians ``[batch, columns, columns]``
    :param scale: the grid's scales ``[batch, rows, groups]`` (a group is
        ``columns // groups`` consecutive columns; one group is per-channel)
    :param percdamp: the sweep's dampening fraction
    :param storage_dtype: dtype the scales are stored in
    :param max_elements: bound on the work tensor per chunk of rows
    :return: refitted scales (float32, same shape as ``scale``), the quantized
        weights on the refitted grid (float32), and per batch item and row the
        error ``(t - w) H (t - w)^T`` before and after, stacked ``[2, batch, rows]``
        (after: from the step's expansion, in float64)
    """
    if quantized.ndim != 3 or quantized.shape != target.shape:
        raise ValueError("quantized and target must have the same shape [batch, rows, columns]")
    batch, rows, columns = quantized.shape
    if scale.ndim != 3 or scale.shape[:2] != (batch, rows):
        raise ValueError(f"scale must have shape [batch, rows, groups], got {tuple(scale.shape)}")
    groups = scale.shape[-1]
    if columns % groups:
        raise ValueError(f"{groups} groups do not divide {columns} columns")
    group_size = columns // groups
    f32 = torch.float32
    old_scale = scale.to(f32)

    def per_column(group_scales):  # [batch, rows, groups] -> [batch, rows, columns]
        return group_scales.repeat_interleave(group_size, dim=-1)

    quantized = quantized.to(f32)
    codes = torch.round(quantized / per_column(old_scale))
    t = target.to(f32)

    # damped as the toolkit's factorize_hessian does: dead columns get 1, then
    # percdamp * mean(diag) on the whole diagonal
    H = hessians.to(f32).clone()
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    diagonal += percdamp * diagonal.mean(dim=-1, keepdim=True)

    f64 = torch.float64
    new_scale = old_scale.clone()
    errors = torch.zeros(2, batch, rows, dtype=f64, device=quantized.device)
    identity = torch.eye(groups, dtype=f64, device=quantized.device)
    chunk = max(1, max_elements // max(1, groups * groups * group_size))
    blocks = H.reshape(batch, groups, group_size, groups, group_size)
    for r1 in range(0, rows, chunk):
        r2 = min(rows, r1 + chunk)
        c = codes[:, r1:r2].reshape(batch, r2 - r1, groups, group_size)
        old = old_scale[:, r1:r2]
        # system = A^T H A: system[b, r, g, h] = c_g^T H_gh c_h
        partial_products = torch.einsum("brgi,bgihj->brghj", c, blocks)
        system = torch.einsum("brghj,brhj->brgh", partial_products, c).to(f64)
        del partial_products
        # with e = t - A s0 (small: no cancellation), gradient = A^T H e and the
        # step d = s - s0 solves (A^T H A + rho I) d = A^T H e; the error after
        # the step is e H e - 2 d . A^T H e + d A^T H A d
        residual = t[:, r1:r2] - (c * old.unsqueeze(-1)).reshape(t[:, r1:r2].shape)
        residual_products = residual @ H
        gradient = (c * residual_products.reshape(c.shape)).sum(-1).to(f64)
        before = (residual * residual_products).sum(-1).to(f64)
        rho = 1e-6 * torch.diagonal(system, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        change, info = torch.linalg.solve_ex(
            system + rho[..., None, None] * identity, gradient.unsqueeze(-1)
        )
        solved = (old.to(f64) + change.squeeze(-1)).to(storage_dtype).to(f32)
        change = solved.to(f64) - old.to(f64)  # the step the stored scales take
        after = (
            before
            - 2 * (change * gradient).sum(-1)
            + (change.unsqueeze(-2) @ system @ change.unsqueeze(-1))[..., 0, 0]
        )
        # a scale may not reach or cross zero (signed full-range scales keep their sign)
        good = (info == 0) & torch.isfinite(solved).all(-1) & (solved * old > 0).all(-1)
        good &= after < before
        new_scale[:, r1:r2] = torch.where(good.unsqueeze(-1), solved, old)
        errors[0, :, r1:r2] = before
        errors[1, :, r1:r2] = torch.where(good, after, before)

    moved = (errors[1] < errors[0]).unsqueeze(-1)  # rows that keep their scales keep their weights
    return new_scale, torch.where(moved, codes * per_column(new_scale), quantized), errors.to(f32)
