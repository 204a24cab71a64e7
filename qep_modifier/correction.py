"""QEP's weight correction as pure tensor functions.

For a Linear with weight ``W`` [out, in], the full-precision model feeds it ``X``
[in, tokens] and the partly quantized model feeds it ``X~``. QEP looks for the
weight that makes the quantized stream reproduce the full-precision output,

    argmin_W^ || W X - W^ X~ ||^2   =>   W^ = W X X~^T (X~ X~^T)^-1
                                          = W + W (X - X~) X~^T (X~ X~^T)^-1,

and moves the weight part of the way there, with a propagation strength ``a``
and a ridge ``l`` on the Gram matrix:

    W* = W + a W C (H~ + l I)^-1,   C = (X - X~) X~^T,   H~ = X~ X~^T.

``C`` and ``H~`` are accumulated with the same normalisation (llm-compressor's
``2 / num_samples``), which cancels in the product.
"""

from __future__ import annotations

import torch

__all__ = [
    "AUTO_CANDIDATES",
    "choose_strength",
    "corrected_weight",
    "relative_output_error",
    "relative_output_errors",
    "CorrectionFailed",
]

#: the strengths ``propagation_strength: auto`` chooses from (:mod:`qep_modifier.strength`)
AUTO_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0)


class CorrectionFailed(RuntimeError):
    """The damped Gram matrix stayed indefinite after every damping retry."""


def corrected_weight(
    weight: torch.Tensor,
    cross_term: torch.Tensor,
    hessian: torch.Tensor,
    propagation_strength: float,
    correction_damping: float,
    solve_dtype: torch.dtype = torch.float64,
    max_retries: int = 6,
) -> tuple[torch.Tensor, float]:
    """Return ``(W*, damping used)`` with ``W* = W + a W C (H~ + l I)^-1``.

    ``l = correction_damping * mean(diag H~)``. The system is solved with a
    Cholesky factorisation in ``solve_dtype`` (never an explicit inverse); if the
    factorisation fails, ``l`` grows tenfold per retry, up to ``max_retries``
    times, and then :class:`CorrectionFailed` is raised. Dead input channels
    (zero diagonal) get a unit diagonal, as GPTQ does. The result has the
    dtype and device of ``weight``.
    """
    if not 0.0 <= propagation_strength <= 1.0:
        raise ValueError(
            f"propagation_strength must be in [0, 1], got {propagation_strength}"
        )
    if correction_damping <= 0:
        raise ValueError(f"correction_damping must be > 0, got {correction_damping}")
    if propagation_strength == 0.0:
        return weight.clone(), 0.0

    gram = hessian.to(solve_dtype).clone()
    diagonal = torch.diagonal(gram)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    damping = correction_damping * diagonal.mean().item()
    work = weight.to(solve_dtype)
    # W C (H~ + l I)^-1 = ((H~ + l I)^-1 (W C)^T)^T, as H~ is symmetric.
    right_hand_side = (work @ cross_term.to(solve_dtype)).t()
    for _ in range(max_retries + 1):
        damped = gram + damping * torch.eye(
            gram.shape[0], dtype=solve_dtype, device=gram.device
        )
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            update = torch.cholesky_solve(right_hand_side, factor).t()
            result = work + propagation_strength * update
            if torch.isfinite(result).all():
                return result.to(dtype=weight.dtype), damping
        damping *= 10.0
    raise CorrectionFailed(
        f"H~ + l I is not positive definite even with l = {damping / 10.0:.3g}"
    )


def choose_strength(
    weight: torch.Tensor,
    fit: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    correction_damping: float,
    candidates: tuple[float, ...] = AUTO_CANDIDATES,
) -> tuple[float, dict[float, float]]:
    """The strength whose correction, fitted on some batches, leaves the smallest
    output error on others: ``(best, {strength: held-out error})``.

    :param fit: ``(C, H~)`` of the fitting batches (same normalisation)
    :param held_out: ``(G, C, H~)`` of the held-out batches
    Each candidate's ``W*`` is :func:`corrected_weight` from ``fit``; its error is
    :func:`relative_output_error` on ``held_out`` (closed form). Ties go to the
    smaller strength; a candidate whose correction fails counts as no better
    than no correction.
    """
    cross_term, hessian = fit
    corrected = []
    for strength in candidates:
        try:
            candidate, _ = corrected_weight(
                weight, cross_term, hessian, strength, correction_damping
            )
        except CorrectionFailed:
            candidate = weight
        corrected.append(candidate)
    errors = dict(zip(candidates, relative_output_errors(weight, corrected, *held_out)))
    best = min(candidates, key=lambda strength: (errors[strength], strength))
    return best, errors


def relative_output_error(
    weight: torch.Tensor,
    candidate: torch.Tensor,
    full_precision_gram: torch.Tensor,
    cross_term: torch.Tensor,
    hessian: torch.Tensor,
) -> float:
    """``||W X - V X~|| / ||W X||`` from accumulated statistics, in float64.

    With ``G = X X^T``, ``C = (X - X~) X~^T`` and ``H~ = X~ X~^T`` (all with the
    same normalisation), ``X X~^T = C + H~`` and

        ||W X - V X~||^2 = tr(W G W^T) - 2 tr(W (C + H~) V^T) + tr(V H~ V^T).
    """
    return relative_output_errors(
        weight, [candidate], full_precision_gram, cross_term, hessian
    )[0]


def relative_output_errors(
    weight: torch.Tensor,
    candidates: list[torch.Tensor],
    full_precision_gram: torch.Tensor,
    cross_term: torch.Tensor,
    hessian: torch.Tensor,
) -> list[float]:
    """:func:`relative_output_error` of several candidates against one weight:
    the terms of ``W`` alone are computed once."""
    weight = weight.double()
    hessian = hessian.double()
    reference = torch.sum((weight @ full_precision_gram.double()) * weight)
    mixed_left = weight @ (cross_term.double() + hessian)
    errors = []
    for candidate in candidates:
        candidate = candidate.double()
        mixed = torch.sum(mixed_left * candidate)
        quantized = torch.sum((candidate @ hessian) * candidate)
        squared = torch.clamp(reference - 2.0 * mixed + quantized, min=0.0)
        errors.append(float(torch.sqrt(squared / reference)) if reference > 0 else 0.0)
    return errors
