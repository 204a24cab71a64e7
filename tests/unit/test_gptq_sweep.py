"""Tests for ``qep_modifier.gptq_sweep.quantize_weight_first_order`` (FOEM sweep)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs
from compressed_tensors.quantization.utils import calculate_range
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.observers import Observer

from qep_modifier.gptq_sweep import (
    FIRST_ORDER_REACHES,
    quantize_weight_first_order,
    validate_first_order_args,
)

PERCDAMP = 0.01


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The sweeps are thousands of tiny ops: intra-op threads only add spin
    overhead (and a lot of it on a busy machine).  Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- #
# problem construction
# --------------------------------------------------------------------------- #


def make_qargs(num_bits, strategy, group_size=None, symmetric=True, actorder=None):
    kwargs = dict(num_bits=num_bits, strategy=strategy, symmetric=symmetric)
    if strategy == "group":
        kwargs["group_size"] = group_size
    if actorder is not None:
        kwargs["actorder"] = actorder
    return QuantizationArgs(**kwargs)


def make_problem(batch, rows, cols, seed, dead_columns=()):
    """Random weights and correlated, normalized Hessians ``2 X X^T / n``."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(batch, rows, cols, generator=gen)
    n = 4 * cols
    hessians = []
    for _ in range(batch):
        mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols**0.5
        feature_scale = 0.5 + 1.5 * torch.rand(cols, 1, generator=gen)
        x = mix @ (feature_scale * torch.randn(cols, n, generator=gen))
        x[list(dead_columns), :] = 0.0
        hessians.append(2.0 * x @ x.T / n)
    return weights, torch.stack(hessians)


def observer_qparams(weights, qargs, widen=1.0):
    """Per-module qparams from llm-compressor's memoryless min-max observer.

    ``widen > 1`` scales the observer scales up a little.  Min-max scales put a
    group's extreme weight exactly on a rounding tie (e.g. -3.5 steps for
    symmetric 3-bit), which float32 and float64 resolve differently; the
    float64 reference comparisons use slightly wider (still valid) scales.
    """
    scales, zero_points = [], []
    for item in weights:
        observer = Observer.load_from_registry(
            "memoryless_minmax", base_name="weight", args=qargs
        )
        observer(item)
        qparams = observer.get_qparams()
        assert qparams["global_scale"] is None
        scales.append(qparams["scale"] * widen)
        zero_points.append(qparams["zero_point"])
    return torch.stack(scales), torch.stack(zero_points)


def run_first_order(weights, hessians, scale, zp, qargs, **kwargs):
    return quantize_weight_first_order(
        weights.clone(), hessians.clone(), scale, zp, None, qargs, **kwargs
    )


def run_gptq(weights, hessians, scale, zp, qargs, **kwargs):
    return quantize_weight(
        weights.clone(), hessians.clone(), scale, zp, None, qargs, **kwargs
    )


# --------------------------------------------------------------------------- #
# float64 reference straight from the paper's equations
# --------------------------------------------------------------------------- #


def sweep_order(hessian, qargs, cols):
    """Column permutation and per-sweep-position group index, as GPTQ uses them."""
    actorder = qargs.actorder
    if actorder is None:
        perm = torch.arange(cols)
    else:
        perm = torch.argsort(torch.diagonal(hessian), descending=True)
    if qargs.strategy == "channel":
        groups = torch.zeros(cols, dtype=torch.long)
    elif actorder == ActivationOrdering.WEIGHT:
        # "static" is an alias of "weight" in compressed-tensors: each column
        # keeps the group (and qparams) of its original position
        groups = perm // qargs.group_size
    else:
        groups = torch.arange(cols) // qargs.group_size
    return perm, groups


def foem_reference(weight, hessian, scale, zp, qargs, beta, reach):
    """Unblocked FOEM sweep of one matrix in float64, explicit OBS form.

    At each column q, with F the not-yet-quantized columns (sweep order),
    Hinv_F = (H_FF)^-1 of the damped Hessian and D = W - W0::

        err  = ((w_q - Q(w_q)) - beta D_q) / [Hinv_F]_qq
        W_F <- W_F - err [Hinv_F]_{q,:} - beta D_F * mask

    mask = 1 on q and on all of F ("all") or on q and q+1 only ("next").
    Booked loss per column: ((w_q - Q(w_q)) - beta D_q)^2 / (2 [Hinv_F]_qq).
    No Cholesky factor, no blocks.  Returns (Q in original order, loss, errs,
    each column just before its rounding in original order).
    """
    rows, cols = weight.shape
    W = weight.to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    perm, groups = sweep_order(hessian, qargs, cols)

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W = W[:, perm]
    H = H[perm][:, perm]
    H += PERCDAMP * torch.mean(torch.diagonal(H)) * torch.eye(cols, dtype=H.dtype)

    s = scale.to(torch.float64)[:, groups]  # [rows, cols] in sweep order
    z = zp.to(torch.float64)[:, groups]
    if qargs.symmetric:
        z = torch.zeros_like(z)
    qmin, qmax = (float(v) for v in calculate_range(qargs, "cpu"))

    W0 = W.clone()
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64)
    errs = torch.zeros_like(W)
    unrounded = torch.zeros_like(W)
    for q in range(cols):
        Hinv_F = torch.linalg.inv(H[q:, q:])
        w = W[:, q].clone()
        unrounded[:, q] = w
        quant = (torch.clamp(torch.round(w / s[:, q] + z[:, q]), qmin, qmax) - z[:, q])
        quant = quant * s[:, q]
        D = W[:, q:] - W0[:, q:]
        numerator = (w - quant) - beta * D[:, 0]
        err = numerator / Hinv_F[0, 0]
        mask = torch.zeros(cols - q, dtype=torch.float64)
        if reach == "all":
            mask[:] = 1.0
        else:
            mask[:2] = 1.0
        W[:, q:] = W[:, q:] - err[:, None] * Hinv_F[0][None, :] - beta * D * mask
        # the constrained update lands column q exactly on its quantized value
        assert torch.allclose(W[:, q], quant, atol=1e-9)
        Q[:, q] = quant
        errs[:, q] = numerator / Hinv_F[0, 0].sqrt()
        loss = loss + (numerator.square() / (2.0 * Hinv_F[0, 0])).sum()
    Q = Q[:, torch.argsort(perm)]
    return Q, loss, errs, unrounded[:, torch.argsort(perm)]


def reference_batch(weights, hessians, scale, zp, qargs, beta, reach):
    outs = [
        foem_reference(weights[b], hessians[b], scale[b], zp[b], qargs, beta, reach)
        for b in range(weights.shape[0])
    ]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


# --------------------------------------------------------------------------- #
# 1. beta = 0 reproduces llm-compressor's quantize_weight bit for bit
# --------------------------------------------------------------------------- #

# (rows, cols, blocksize, strategy, group_size, symmetric, bits, actorder, batch, dead)
EXACT_CASES = [
    (16, 64, 128, "group", 32, True, 4, None, 1, ()),
    (16, 64, 32, "group", 64, False, 3, "static", 2, ()),
    (48, 96, 128, "group", 32, False, 2, "weight", 1, (5,)),
    (48, 96, 32, "channel", None, True, 3, None, 2, (0, 40)),
    (16, 256, 128, "group", 64, True, 2, "weight", 2, (100,)),
    (48, 256, 32, "group", 32, False, 4, "static", 1, (7,)),
    (16, 96, 32, "channel", None, False, 4, "weight", 1, ()),
    (48, 64, 128, "channel", None, True, 2, "static", 2, (63,)),
    (16, 256, 32, "channel", None, False, 3, None, 1, (200,)),
    (48, 256, 128, "group", 64, False, 3, None, 2, ()),
    (16, 96, 128, "group", 32, True, 3, "static", 2, (50,)),
    (48, 64, 32, "group", 32, True, 4, "weight", 2, (1,)),
    (16, 64, 32, "group", 64, True, 2, None, 2, ()),
    (48, 96, 32, "group", 32, False, 4, None, 1, ()),
    (16, 256, 128, "channel", None, True, 4, "weight", 1, ()),
]


@pytest.mark.parametrize(
    "rows,cols,blocksize,strategy,group_size,symmetric,bits,actorder,batch,dead",
    EXACT_CASES,
)
def test_zero_strength_matches_quantize_weight_bitwise(
    rows, cols, blocksize, strategy, group_size, symmetric, bits, actorder, batch, dead
):
    qargs = make_qargs(bits, strategy, group_size, symmetric, actorder)
    seed = rows * 1000 + cols + bits
    weights, hessians = make_problem(batch, rows, cols, seed, dead)
    scale, zp = observer_qparams(weights, qargs)

    expected_q, expected_loss, expected_rtn = run_gptq(
        weights, hessians, scale, zp, qargs, blocksize=blocksize, percdamp=PERCDAMP
    )
    # at strength 0 the reach is irrelevant; alternate it between cases
    reach = FIRST_ORDER_REACHES[(rows + cols + bits + blocksize) % 2]
    got_q, got_loss, got_rtn = run_first_order(
        weights,
        hessians,
        scale,
        zp,
        qargs,
        blocksize=blocksize,
        percdamp=PERCDAMP,
        first_order_strength=0.0,
        first_order_reach=reach,
    )
    assert got_q.dtype == expected_q.dtype
    assert torch.equal(got_q, expected_q)
    assert torch.equal(got_loss, expected_loss)
    assert torch.equal(got_rtn, expected_rtn)
    assert not got_rtn.any()
    if dead:
        assert torch.all(expected_q[:, :, list(dead)] == 0)


def test_zero_strength_default_arguments_match_quantize_weight():
    qargs = make_qargs(4, "group", 32, True)
    weights, hessians = make_problem(1, 16, 160, seed=11)
    scale, zp = observer_qparams(weights, qargs)
    expected = quantize_weight(
        weights.clone(), hessians.clone(), scale, zp, None, qargs
    )
    got = quantize_weight_first_order(
        weights.clone(), hessians.clone(), scale, zp, None, qargs
    )
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# 2./3. FOEM against the float64 reference (quantized weights and losses)
# --------------------------------------------------------------------------- #

# (rows, cols, blocksize, strategy, group_size, symmetric, bits, actorder, dead)
REFERENCE_CASES = [
    (16, 64, 16, "group", 32, True, 4, None, ()),
    (16, 96, 32, "channel", None, False, 3, None, (10,)),
    (48, 64, 128, "group", 32, False, 3, None, ()),
    (16, 96, 40, "group", 32, True, 3, "static", (3,)),
    (16, 64, 24, "group", 32, False, 4, "weight", ()),
    (16, 96, 64, "channel", None, True, 4, "weight", ()),
]


@pytest.mark.parametrize("reach", FIRST_ORDER_REACHES)
@pytest.mark.parametrize(
    "rows,cols,blocksize,strategy,group_size,symmetric,bits,actorder,dead",
    REFERENCE_CASES,
)
def test_first_order_matches_float64_reference(
    reach, rows, cols, blocksize, strategy, group_size, symmetric, bits, actorder, dead
):
    beta = 0.1
    qargs = make_qargs(bits, strategy, group_size, symmetric, actorder)
    seed = rows + 7 * cols + bits
    weights, hessians = make_problem(2, rows, cols, seed=seed, dead_columns=dead)
    scale, zp = observer_qparams(weights, qargs, widen=1.01)
    atol = 1e-4 * weights.abs().max().item()

    got_q, got_loss, got_rtn = run_first_order(
        weights,
        hessians,
        scale,
        zp,
        qargs,
        blocksize=blocksize,
        percdamp=PERCDAMP,
        first_order_strength=beta,
        first_order_reach=reach,
    )
    assert not got_rtn.any()
    ref_q, ref_loss = reference_batch(weights, hessians, scale, zp, qargs, beta, reach)
    torch.testing.assert_close(got_q.double(), ref_q, rtol=0, atol=atol)
    # 3. loss bookkeeping: sum over columns of err^2 / 2 with the FOEM error term
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=1e-4, atol=0)

    # the comparison is discriminating: the other reach and plain GPTQ land
    # far outside the tolerance from this reference
    other = "next" if reach == "all" else "all"
    for strength, other_reach in ((beta, other), (0.0, reach)):
        other_q, other_loss, _ = run_first_order(
            weights,
            hessians,
            scale,
            zp,
            qargs,
            blocksize=blocksize,
            percdamp=PERCDAMP,
            first_order_strength=strength,
            first_order_reach=other_reach,
        )
        assert (other_q.double() - ref_q).abs().max() > 100 * atol
        assert not torch.allclose(other_loss.double(), ref_loss, rtol=1e-3)


def test_reference_reduces_to_gptq_at_zero_strength():
    """The float64 reference with beta = 0 agrees with llm-compressor's GPTQ."""
    qargs = make_qargs(4, "group", 32, False, "static")
    weights, hessians = make_problem(1, 16, 96, seed=5, dead_columns=(17,))
    scale, zp = observer_qparams(weights, qargs, widen=1.01)
    ref_q, ref_loss = reference_batch(weights, hessians, scale, zp, qargs, 0.0, "all")
    got_q, got_loss, _ = run_gptq(weights, hessians, scale, zp, qargs, blocksize=32)
    atol = 1e-4 * weights.abs().max().item()
    torch.testing.assert_close(got_q.double(), ref_q, rtol=0, atol=atol)
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=1e-4, atol=0)


@pytest.mark.parametrize("reach", FIRST_ORDER_REACHES)
def test_loss_is_sum_of_half_squared_foem_errors(reach):
    """Returned loss == sum over rows and columns of err^2 / 2, where
    err = ((w - q) - beta (w - w0)) / U_qq as recomputed by the reference."""
    beta = 0.25
    qargs = make_qargs(3, "group", 32, False, "weight")
    weights, hessians = make_problem(2, 16, 64, seed=21, dead_columns=(9,))
    scale, zp = observer_qparams(weights, qargs, widen=1.01)
    _, got_loss, _ = run_first_order(
        weights, hessians, scale, zp, qargs, blocksize=24,
        first_order_strength=beta, first_order_reach=reach,
    )
    expected = []
    for b in range(2):
        _, _, errs, _ = foem_reference(
            weights[b], hessians[b], scale[b], zp[b], qargs, beta, reach
        )
        expected.append((errs.square() / 2).sum())
    expected = torch.stack(expected)
    torch.testing.assert_close(got_loss.double(), expected, rtol=1e-4, atol=0)
    # and it is not GPTQ's loss (the beta term is booked)
    _, gptq_loss, _ = run_gptq(weights, hessians, scale, zp, qargs, blocksize=24)
    assert not torch.allclose(got_loss, gptq_loss, rtol=1e-3)


# --------------------------------------------------------------------------- #
# the unrounded weights (block tuning's latent codes start from them)
# --------------------------------------------------------------------------- #

# (strategy, group_size, symmetric, bits, actorder, beta, blocksize, dead)
UNROUNDED_CASES = [
    ("group", 32, True, 3, "static", 0.0, 24, (5,)),
    ("group", 32, False, 4, None, 0.1, 32, ()),
    ("channel", None, True, 3, "weight", 0.1, 40, ()),
    ("group", 16, False, 2, "weight", 0.0, 128, (60,)),
]


@pytest.mark.parametrize("strategy,group_size,symmetric,bits,actorder,beta,blocksize,dead", UNROUNDED_CASES)
def test_unrounded_weights_match_float64_and_round_to_the_codes(
    strategy, group_size, symmetric, bits, actorder, beta, blocksize, dead
):
    """Each column just before its rounding, in the original column order
    (act-order undone): close to the float64 reference's; rounded with the
    sweep's scales, exactly the sweep's codes; asking for it changes nothing."""
    qargs = make_qargs(bits, strategy, group_size, symmetric, actorder)
    weights, hessians = make_problem(2, 16, 96, seed=31 + bits, dead_columns=dead)
    scale, zp = observer_qparams(weights, qargs, widen=1.01)
    options = dict(blocksize=blocksize, percdamp=PERCDAMP, first_order_strength=beta)
    plain = run_first_order(weights, hessians, scale, zp, qargs, **options)
    unrounded = torch.full_like(weights, float("nan"))
    asked = run_first_order(weights, hessians, scale, zp, qargs, unrounded=unrounded, **options)
    for with_, without in zip(asked, plain):
        assert torch.equal(with_, without)

    atol = 1e-4 * weights.abs().max().item()
    for b in range(2):
        *_, reference = foem_reference(weights[b], hessians[b], scale[b], zp[b], qargs, beta, "next")
        torch.testing.assert_close(unrounded[b].double(), reference, rtol=0, atol=atol)

    # each stored column's scale: its own group's (act-order keeps the groups)
    columns = torch.arange(96) // (group_size or 96)
    column_scale, column_zero = scale[:, :, columns], zp[:, :, columns].to(torch.float32)
    if symmetric:
        column_zero = torch.zeros_like(column_zero)
    lowest, highest = (float(v) for v in calculate_range(qargs, "cpu"))
    codes = torch.round(plain[0] / column_scale + column_zero)
    from_unrounded = torch.clamp(torch.round(unrounded / column_scale + column_zero), lowest, highest)
    assert torch.equal(from_unrounded, codes)
    # not trivially so: the sweep moved the weights before rounding them
    live = [c for c in range(96) if c not in dead]
    assert (unrounded - weights)[:, :, live].abs().max() > 100 * atol
    assert not torch.equal(torch.round(weights / column_scale + column_zero).clamp(lowest, highest), codes)


# --------------------------------------------------------------------------- #
# blocking, batching, RTN fallback
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reach", FIRST_ORDER_REACHES)
def test_blocked_sweep_matches_unblocked(reach):
    """blocksize=1 uses only the lazy cross-block update, blocksize=cols only
    the in-block loop; both must agree with partial blocks of other sizes."""
    qargs = make_qargs(3, "group", 32, True, "static")
    weights, hessians = make_problem(2, 16, 96, seed=3)
    scale, zp = observer_qparams(weights, qargs, widen=1.01)
    results = [
        run_first_order(
            weights, hessians, scale, zp, qargs, blocksize=bs,
            first_order_strength=0.1, first_order_reach=reach,
        )
        for bs in (96, 1, 7, 32, 128)
    ]
    atol = 1e-4 * weights.abs().max().item()
    for q, loss, _ in results[1:]:
        torch.testing.assert_close(q, results[0][0], rtol=0, atol=atol)
        torch.testing.assert_close(loss, results[0][1], rtol=1e-4, atol=0)
    gptq_q, _, _ = run_gptq(weights, hessians, scale, zp, qargs, blocksize=32)
    assert (results[0][0] - gptq_q).abs().max() > 100 * atol


def test_batch_items_are_independent():
    qargs = make_qargs(4, "group", 32, False, "weight")
    weights, hessians = make_problem(2, 16, 64, seed=8, dead_columns=(30,))
    scale, zp = observer_qparams(weights, qargs)
    batched_q, batched_loss, _ = run_first_order(
        weights, hessians, scale, zp, qargs, blocksize=16, first_order_strength=0.1
    )
    for b in range(2):
        q, loss, _ = run_first_order(
            weights[b : b + 1], hessians[b : b + 1], scale[b : b + 1], zp[b : b + 1],
            qargs, blocksize=16, first_order_strength=0.1,
        )
        torch.testing.assert_close(q[0], batched_q[b], rtol=0, atol=1e-6)
        torch.testing.assert_close(loss[0], batched_loss[b], rtol=1e-5, atol=0)


@pytest.mark.parametrize("reach", FIRST_ORDER_REACHES)
def test_rtn_fallback_unchanged_by_first_order_term(reach):
    """A non-PD Hessian falls back to RTN; the pull has nothing to act on."""
    qargs = make_qargs(4, "group", 32, True)
    weights, hessians = make_problem(2, 16, 64, seed=13)
    hessians[1] = -hessians[1]  # negative definite: Cholesky fails
    scale, zp = observer_qparams(weights, qargs)
    expected = run_gptq(weights, hessians, scale, zp, qargs, blocksize=16)
    got = run_first_order(
        weights, hessians, scale, zp, qargs, blocksize=16,
        first_order_strength=0.1, first_order_reach=reach,
    )
    assert got[2].tolist() == [False, True]
    assert torch.equal(got[2], expected[2])
    assert torch.equal(got[0][1], expected[0][1])
    assert torch.equal(got[1][1], expected[1][1])
    assert not torch.allclose(got[0][0], expected[0][0])


# --------------------------------------------------------------------------- #
# 4. argument validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reach", ["ALL", "nearest", "", None, 1])
def test_bad_reach_raises(reach):
    qargs = make_qargs(4, "channel")
    weights, hessians = make_problem(1, 4, 8, seed=0)
    scale, zp = observer_qparams(weights, qargs)
    with pytest.raises(ValueError, match="first_order_reach") as info:
        quantize_weight_first_order(
            weights, hessians, scale, zp, None, qargs,
            first_order_strength=0.1, first_order_reach=reach,
        )
    assert "'all'" in str(info.value) and "'next'" in str(info.value)


@pytest.mark.parametrize(
    "strength", [-0.1, -1e-12, float("nan"), float("inf"), "0.1", True]
)
def test_bad_strength_raises(strength):
    qargs = make_qargs(4, "channel")
    weights, hessians = make_problem(1, 4, 8, seed=0)
    scale, zp = observer_qparams(weights, qargs)
    with pytest.raises(ValueError, match="first_order_strength"):
        quantize_weight_first_order(
            weights, hessians, scale, zp, None, qargs, first_order_strength=strength
        )


def test_validate_first_order_args_accepts_good_values():
    assert validate_first_order_args(0, "all") == (0.0, "all")
    assert validate_first_order_args(0.1, "next") == (0.1, "next")
    with pytest.raises(ValueError, match="first_order_reach"):
        validate_first_order_args(0.1, "All")


# ------------------------------------------------ group scales chosen by the sweep


def _group_args(bits=3, group_size=16, symmetric=True):
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
    )


def test_group_aware_order_keeps_groups_together_most_important_first():
    from qep_modifier.gptq_sweep import group_aware_order

    diagonal = torch.tensor([[1.0, 5.0, 2.0, 9.0, 0.5, 0.1]])  # groups of 2: sums 6, 11, 0.6
    order = group_aware_order(diagonal, group_size=2)
    assert order.tolist() == [[3, 2, 1, 0, 4, 5]]
    assert sorted(order[0].tolist()) == list(range(6))


def test_sweep_with_fixed_group_scales_is_the_toolkits_sweep():
    from qep_modifier.gptq_sweep import quantize_weight_group_scales

    generator = torch.Generator().manual_seed(5)
    weights = torch.randn(2, 8, 64, generator=generator)
    inputs = torch.randn(2, 256, 64, generator=generator)
    hessians = inputs.transpose(1, 2) @ inputs / 256
    args = _group_args()
    observers = [Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args) for _ in range(2)]
    fixed = []
    for item in range(2):
        observers[item](weights[item])
        fixed.append(observers[item].get_qparams())
    scale = torch.stack([q["scale"] for q in fixed])
    zero = torch.stack([q["zero_point"] for q in fixed])
    reference, _, _ = quantize_weight(weights.clone(), hessians.clone(), scale, zero, None, args, 32, 0.01)

    def same_scales(item, group_weights):  # the group's precomputed scale, whatever it sees
        column = same_scales.calls[item] * args.group_size
        same_scales.calls[item] += 1
        group = column // args.group_size
        return fixed[item]["scale"][:, group : group + 1], fixed[item]["zero_point"][:, group : group + 1]

    same_scales.calls = [0, 0]
    ours, _, _, scales, zeros = quantize_weight_group_scales(
        weights.clone(), hessians.clone(), args, same_scales, blocksize=32, group_order=False
    )
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert torch.equal(scales, scale) and torch.equal(zeros, zero)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_sweep_group_scales_land_on_their_grid(symmetric, beta):
    from compressed_tensors.quantization import fake_quantize

    from qep_modifier.gptq_sweep import quantize_weight_group_scales

    generator = torch.Generator().manual_seed(6)
    weights = torch.randn(1, 8, 64, generator=generator)
    inputs = torch.randn(1, 256, 64, generator=generator) * torch.linspace(0.2, 3, 64)
    hessians = inputs.transpose(1, 2) @ inputs / 256
    args = _group_args(symmetric=symmetric)
    observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
    seen = []

    def by_observer(item, group_weights):
        seen.append(group_weights.shape)
        observer(group_weights)
        qparams = observer.get_qparams()
        return qparams["scale"], qparams["zero_point"]

    quantized, losses, fell_back, scales, zeros = quantize_weight_group_scales(
        weights, hessians.clone(), args, by_observer, blocksize=32, first_order_strength=beta
    )
    assert seen == [torch.Size([8, 16])] * 4 and not fell_back.any()
    regrid = fake_quantize(quantized[0], scales[0], zeros[0], args)
    torch.testing.assert_close(regrid, quantized[0], rtol=0, atol=1e-6)
    assert torch.isfinite(losses).all()


# ------------------------------------------------ scales refitted to the sweep's codes


def _refit_problem(symmetric=True, bits=3, group_size=16, rows=8, columns=64, seed=7, observer="memoryless_mse"):
    """GPTQ output on an mse grid (``full_range_mse``: signed scales), with its
    target weights and Hessian."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(1, rows, columns, generator=generator)
    inputs = torch.randn(1, 512, columns, generator=generator) * torch.linspace(0.2, 3, columns)
    hessians = inputs.transpose(1, 2) @ inputs / 512
    args = _group_args(bits=bits, group_size=group_size, symmetric=symmetric)
    observer = Observer.load_from_registry(observer, base_name="weight", args=args)
    observer(weights[0])
    qparams = observer.get_qparams()
    scale, zero = qparams["scale"][None], qparams["zero_point"][None]
    quantized, _, _ = quantize_weight(
        weights.clone(), hessians.clone(), scale, zero, None, args, 32, PERCDAMP
    )
    return quantized, weights, hessians, scale, zero, args


def _damped(hessian, percdamp=PERCDAMP):
    """``hessian`` in float64 with the sweep's damping (no dead columns here)."""
    H = hessian.double().clone()
    return H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)


def _refit_reference(quantized, target, hessian, scale, percdamp):
    """Per row, in float64: explicit A (codes in their group's column) and the
    normal equations of min (t - A s) H (t - A s)^T, H damped as the sweep does."""
    H = _damped(hessian, percdamp)
    rows, columns = target.shape
    groups = scale.shape[-1]
    size = columns // groups
    solutions = []
    for row in range(rows):
        codes = torch.round(quantized[row].double() / scale[row].double().repeat_interleave(size))
        A = torch.zeros(columns, groups, dtype=torch.float64)
        A[torch.arange(columns), torch.arange(columns) // size] = codes
        solutions.append(torch.linalg.solve(A.T @ H @ A, A.T @ H @ target[row].double()))
    return torch.stack(solutions)


REFIT_GRIDS = {
    "symmetric": dict(symmetric=True),
    "asymmetric": dict(symmetric=False),
    "full_range": dict(symmetric=True, observer="full_range_mse"),  # signed scales
}


@pytest.mark.parametrize("grid", list(REFIT_GRIDS))
def test_refit_scales_match_float64_least_squares(grid):
    import qep_modifier.full_range  # noqa: F401  (registers full_range_mse)
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, _, _ = _refit_problem(**REFIT_GRIDS[grid])
    if grid == "full_range":
        assert (scale < 0).any() and (scale > 0).any()
    refitted, _, errors = refit_group_scales(quantized, target, hessians, scale, percdamp=PERCDAMP)
    reference = _refit_reference(quantized[0], target[0], hessians[0], scale[0], PERCDAMP)
    improved = errors[1, 0] < errors[0, 0]
    assert improved.all()  # every row of this problem moves, so every row is compared
    torch.testing.assert_close(refitted[0].double(), reference, rtol=2e-4, atol=0)
    assert torch.equal(refitted.sign(), scale.sign())


@pytest.mark.parametrize("grid", list(REFIT_GRIDS))
def test_refit_keeps_codes_and_lowers_every_rows_error(grid):
    import qep_modifier.full_range  # noqa: F401  (registers full_range_mse)
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, zero, args = _refit_problem(**REFIT_GRIDS[grid], bits=2)
    refitted, weights, errors = refit_group_scales(quantized, target, hessians, scale)
    size = args.group_size
    old_codes = torch.round(quantized / scale.repeat_interleave(size, dim=-1))
    new_codes = weights / refitted.repeat_interleave(size, dim=-1)
    torch.testing.assert_close(new_codes, old_codes, rtol=0, atol=1e-4)
    # on the stored grid: fake-quantizing with the new scales and old zero points is a no-op
    from compressed_tensors.quantization import fake_quantize

    regrid = fake_quantize(weights[0], refitted[0], zero[0], args)
    torch.testing.assert_close(regrid, weights[0], rtol=0, atol=1e-6)
    assert (errors[1] <= errors[0]).all() and errors[1].sum() < 0.99 * errors[0].sum()

    # the reported error (from the quadratic's expansion) is the direct one, in float64
    difference = (target - weights)[0].double()
    direct = ((difference @ _damped(hessians[0])) * difference).sum(-1)
    torch.testing.assert_close(errors[1, 0].double(), direct, rtol=1e-4, atol=0)


def test_refit_leaves_groups_without_codes_and_rounds_to_the_storage_dtype():
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, _, _ = _refit_problem()
    quantized[:, :, :16] = 0.0  # group 0: every code is zero
    refitted, weights, _ = refit_group_scales(
        quantized, target, hessians, scale, storage_dtype=torch.bfloat16
    )
    # the group keeps its old scale (as the checkpoint stores it, in bfloat16)
    torch.testing.assert_close(
        refitted[..., 0], scale[..., 0].to(torch.bfloat16).float(), rtol=1e-6, atol=0
    )
    assert torch.equal(refitted, refitted.to(torch.bfloat16).float())
    assert not torch.equal(refitted[..., 1:], scale[..., 1:])
    assert torch.equal(weights[:, :, :16], torch.zeros_like(weights[:, :, :16]))


def test_refit_per_channel_is_one_group():
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, _, _ = _refit_problem()
    channel_scale = scale.amax(-1, keepdim=True)
    channel = torch.round(quantized / channel_scale) * channel_scale  # any grid of one scale
    refitted, _, errors = refit_group_scales(channel, target, hessians, channel_scale)
    reference = _refit_reference(channel[0], target[0], hessians[0], channel_scale[0], PERCDAMP)
    assert refitted.shape == (1, 8, 1) and (errors[1] < errors[0]).all()
    torch.testing.assert_close(refitted[0].double(), reference, rtol=2e-4, atol=0)


def test_refit_rejects_mismatched_shapes():
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, _, _ = _refit_problem()
    with pytest.raises(ValueError, match="same shape"):
        refit_group_scales(quantized, target[:, :4], hessians, scale)
    with pytest.raises(ValueError, match="do not divide"):
        refit_group_scales(quantized, target, hessians, scale[..., :3])


def test_refit_keeps_the_scales_of_rows_it_cannot_improve():
    from qep_modifier.gptq_sweep import refit_group_scales

    quantized, target, hessians, scale, _, _ = _refit_problem()
    target[:, :4] = quantized[:, :4]  # rows 0-3 already sit on their grid: error 0
    refitted, weights, errors = refit_group_scales(quantized, target, hessians, scale)
    assert torch.equal(refitted[:, :4], scale[:, :4])
    assert torch.equal(weights[:, :4], quantized[:, :4])
    assert (errors[:, 0, :4] == 0).all()
    assert (errors[1, 0, 4:] < errors[0, 0, 4:]).all()
