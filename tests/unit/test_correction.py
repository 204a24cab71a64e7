"""The QEP correction against float64 references on random inputs."""

import pytest
import torch

from qep_modifier.correction import CorrectionFailed, corrected_weight, relative_output_error
from qep_modifier.statistics import accumulate_cross_term


def _streams(rows=12, width=24, tokens=400, noise=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    full_precision = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    quantized = full_precision + noise * torch.randn(
        tokens, width, generator=generator, dtype=torch.float64
    )
    return weight, full_precision, quantized


def _statistics(full_precision, quantized):
    """H~ and C as the modifier accumulates them (float64, 2/n normalisation)."""
    width = quantized.shape[-1]
    cross = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, quantized.shape[0], 100):  # four "batches"
        accumulate_cross_term(
            full_precision[start : start + 100], quantized[start : start + 100], cross
        )
    hessian = 2.0 * quantized.t() @ quantized
    return hessian / 4, cross / 4


def test_full_strength_equals_least_squares_solution():
    """a = 1, l -> 0: W* solves min ||W X - W^ X~|| (a direct float64 lstsq)."""
    weight, full_precision, noise = _streams()
    # upstream error that a weight can explain: a linear distortion, plus noise
    distortion = torch.eye(24, dtype=torch.float64) + 0.2 * torch.randn(
        24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    quantized = full_precision @ distortion + 0.05 * (noise - full_precision)
    hessian, cross = _statistics(full_precision, quantized)
    corrected, _ = corrected_weight(
        weight, cross, hessian, propagation_strength=1.0, correction_damping=1e-12
    )
    # rows of W^ X~ = W X  <=>  X~^T W^^T = X^T W^T, tokens along the rows
    reference = torch.linalg.lstsq(quantized, full_precision @ weight.t()).solution.t()
    torch.testing.assert_close(corrected, reference, rtol=1e-8, atol=1e-8)
    # and it really is better than the uncorrected weight on that objective
    residual = lambda w: torch.linalg.norm(full_precision @ weight.t() - quantized @ w.t())
    assert residual(corrected) < 0.5 * residual(weight)


def test_strength_interpolates_and_damping_is_a_ridge():
    weight, full_precision, quantized = _streams(seed=3)
    hessian, cross = _statistics(full_precision, quantized)
    damping = 0.1
    half, used = corrected_weight(weight, cross, hessian, 0.5, damping)
    ridge = damping * torch.diagonal(hessian).mean()
    assert used == pytest.approx(ridge.item())
    target = weight @ cross @ torch.linalg.inv(
        hessian + ridge * torch.eye(hessian.shape[0], dtype=torch.float64)
    )
    torch.testing.assert_close(half, weight + 0.5 * target, rtol=1e-9, atol=1e-9)
    zero, _ = corrected_weight(weight, cross, hessian, 0.0, damping)
    assert torch.equal(zero, weight)


def test_float32_inputs_give_float32_result_close_to_float64():
    weight, full_precision, quantized = _streams(seed=5)
    hessian, cross = _statistics(full_precision, quantized)
    exact, _ = corrected_weight(weight, cross, hessian, 0.5, 0.01)
    single, _ = corrected_weight(weight.float(), cross.float(), hessian.float(), 0.5, 0.01)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-5)


def test_rank_deficient_gram_is_damped_and_finite():
    weight, full_precision, _ = _streams(tokens=1)  # one token: H~ has rank 1
    quantized = full_precision * 0.9
    hessian, cross = _statistics(full_precision.repeat(400, 1), quantized.repeat(400, 1))
    hessian[3, :] = 0.0  # a dead input channel as well
    hessian[:, 3] = 0.0
    cross[:, 3] = 0.0
    cross[3, :] = 0.0
    result, _ = corrected_weight(weight, cross, hessian, 1.0, 1e-9)
    assert torch.isfinite(result).all()
    assert not torch.equal(result, weight)


def test_indefinite_gram_retries_then_raises():
    weight = torch.randn(4, 6, dtype=torch.float64)
    hessian = -torch.eye(6, dtype=torch.float64)
    hessian[0, 0] = 100.0  # mean diagonal positive, matrix indefinite
    with pytest.raises(CorrectionFailed, match="not positive definite"):
        corrected_weight(weight, torch.ones(6, 6, dtype=torch.float64), hessian, 0.5, 1e-6, max_retries=2)


def test_bad_arguments_name_the_field():
    weight = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="propagation_strength"):
        corrected_weight(weight, weight, torch.eye(2), 1.5, 0.01)
    with pytest.raises(ValueError, match="correction_damping"):
        corrected_weight(weight, weight, torch.eye(2), 0.5, 0.0)


def test_relative_output_error_matches_direct_computation():
    weight, full_precision, quantized = _streams(seed=7)
    hessian, cross = _statistics(full_precision, quantized)
    gram = 2.0 * full_precision.t() @ full_precision / 4
    candidate = weight + 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    direct = torch.linalg.norm(full_precision @ weight.t() - quantized @ candidate.t()) / torch.linalg.norm(
        full_precision @ weight.t()
    )
    assert relative_output_error(weight, candidate, gram, cross, hessian) == pytest.approx(direct.item(), rel=1e-9)
    # the least-squares correction can only lower it
    corrected, _ = corrected_weight(weight, cross, hessian, 1.0, 1e-12)
    assert relative_output_error(weight, corrected, gram, cross, hessian) < relative_output_error(
        weight, weight, gram, cross, hessian
    )


def _normalised(full_precision, quantized):
    """(G, C, H~) in float64 with the modifier's 2/n normalisation (n = 1)."""
    return (
        2.0 * full_precision.t() @ full_precision,
        2.0 * (full_precision - quantized).t() @ quantized,
        2.0 * quantized.t() @ quantized,
    )


def test_auto_held_out_error_is_the_direct_one():
    from qep_modifier.correction import AUTO_CANDIDATES, choose_strength

    weight, x_fit, x_q_fit = _streams(seed=11)
    _, x_held, x_q_held = _streams(seed=12)
    _, fit_cross, fit_hessian = _normalised(x_fit, x_q_fit)
    held = _normalised(x_held, x_q_held)
    best, errors = choose_strength(weight, (fit_cross, fit_hessian), held, correction_damping=0.01)
    assert set(errors) == set(AUTO_CANDIDATES) and best in AUTO_CANDIDATES
    for strength, error in errors.items():
        candidate, _ = corrected_weight(weight, fit_cross, fit_hessian, strength, 0.01)
        direct = torch.linalg.norm(weight @ x_held.t() - candidate @ x_q_held.t()) / torch.linalg.norm(
            weight @ x_held.t()
        )
        assert error == pytest.approx(direct.item(), rel=1e-9), strength


def test_auto_picks_no_correction_where_it_does_not_generalise():
    from qep_modifier.correction import choose_strength

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    x_fit = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    distortion = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=generator, dtype=torch.float64)
    # the fitting batches' quantized stream is distorted; the held-out one is not
    x_q_fit = x_fit @ distortion
    x_held = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    _, fit_cross, fit_hessian = _normalised(x_fit, x_q_fit)
    best, errors = choose_strength(weight, (fit_cross, fit_hessian), _normalised(x_held, x_held), 0.01)
    assert best == 0.0 and errors[0.0] == pytest.approx(0.0, abs=1e-12)
    assert errors[1.0] > errors[0.5] > errors[0.0]


def test_auto_picks_a_correction_where_the_shift_is_shared():
    from qep_modifier.correction import choose_strength

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    distortion = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=generator, dtype=torch.float64)
    x_fit, x_held = (torch.randn(300, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    _, fit_cross, fit_hessian = _normalised(x_fit, x_fit @ distortion)
    best, errors = choose_strength(
        weight, (fit_cross, fit_hessian), _normalised(x_held, x_held @ distortion), 0.01
    )
    assert best > 0.0 and errors[best] < errors[0.0]


def test_several_candidates_score_as_one_at_a_time():
    from qep_modifier.correction import relative_output_errors

    weight, x, x_q = _streams(seed=21)
    gram, cross, hessian = _normalised(x, x_q)
    candidates = [weight, weight * 0.9, weight + 0.01]
    together = relative_output_errors(weight, candidates, gram, cross, hessian)
    assert together == [relative_output_error(weight, c, gram, cross, hessian) for c in candidates]
    assert together[0] > 0  # the streams differ: the original weight has an error
