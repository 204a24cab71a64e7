"""LinearStatistics and accumulate_batch against float64 references and
llm-compressor's own accumulation, on random tensors: no model, no oneshot."""

import pytest
import torch
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

from qep_modifier.statistics import LinearStatistics, accumulate_batch, accumulate_cross_term

WIDTH = 16


def _batches(seed, count=3, tokens=5, noise=0.1):
    generator = torch.Generator().manual_seed(seed)
    full_precision = [torch.randn(1, tokens, WIDTH, generator=generator) for _ in range(count)]
    quantized = [x + noise * torch.randn(x.shape, generator=generator) for x in full_precision]
    return full_precision, quantized


def _stats(module, **kwargs):
    return LinearStatistics.empty(module, "cpu", **kwargs)


def test_statistics_match_float64_references():
    module = torch.nn.Linear(WIDTH, 4)
    full_precision, quantized = _batches(0)
    stats = _stats(module, cross_term=True, full_precision_gram=True)
    for x, x_q in zip(full_precision, quantized):
        accumulate_batch({module: stats}, {module: [x_q]}, {module: [x]})
    x = torch.cat(full_precision, dim=1).reshape(-1, WIDTH).double()
    x_q = torch.cat(quantized, dim=1).reshape(-1, WIDTH).double()
    torch.testing.assert_close(stats.hessian.double(), 2 * x_q.t() @ x_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.cross_term.double(), 2 * (x - x_q).t() @ x_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.full_precision_gram.double(), 2 * x.t() @ x, rtol=1e-5, atol=1e-5)
    assert stats.num_samples.item() == 3 and stats.tokens == 15 and stats.paired
    hessian, cross_term, gram = stats.normalised()
    torch.testing.assert_close(hessian.double(), 2 * x_q.t() @ x_q / 3, rtol=1e-5, atol=1e-5)


def test_hessian_is_gptq_modifiers_bit_for_bit_with_one_product_per_shared_input(monkeypatch):
    q, k, v = (torch.nn.Linear(WIDTH, size) for size in (8, 4, 4))
    _, quantized = _batches(1)
    # GPTQModifier: accumulate_hessian into each module's own Hessian, in place
    reference, count = make_empty_hessian(q), torch.zeros(())
    for x_q in quantized:
        reference, count = accumulate_hessian(x_q, q, reference, count)

    import qep_modifier.statistics as statistics_module

    products = []
    monkeypatch.setattr(
        statistics_module,
        "accumulate_hessian",
        lambda *args: products.append(1) or accumulate_hessian(*args),
    )
    stats = {module: _stats(module) for module in (q, k, v)}
    for x_q in quantized:  # q, k and v fed the very same tensor
        accumulate_batch(stats, {q: [x_q], k: [x_q], v: [x_q]})
    assert len(products) == len(quantized)
    for module in (q, k, v):
        assert torch.equal(stats[module].hessian, reference)
        assert torch.equal(stats[module].num_samples, count)


def test_equal_values_in_different_tensors_are_separate_products(monkeypatch):
    import qep_modifier.statistics as statistics_module

    products = []
    monkeypatch.setattr(
        statistics_module,
        "accumulate_hessian",
        lambda *args: products.append(1) or accumulate_hessian(*args),
    )
    first, second = torch.nn.Linear(WIDTH, 3), torch.nn.Linear(WIDTH, 3)
    inp = torch.randn(5, WIDTH)
    stats = {first: _stats(first), second: _stats(second)}
    accumulate_batch(stats, {first: [inp], second: [inp * 2]})
    assert len(products) == 2
    torch.testing.assert_close(stats[second].hessian, 4 * stats[first].hessian)


def test_streams_with_different_tokens_are_unpaired():
    module = torch.nn.Linear(WIDTH, 4)
    stats = _stats(module, cross_term=True, full_precision_gram=True)
    accumulate_batch({module: stats}, {module: [torch.randn(3, WIDTH)]}, {module: [torch.randn(5, WIDTH)]})
    assert not stats.paired and stats.cross_term is None and stats.full_precision_gram is None
    assert stats.tokens == 3 and stats.hessian.abs().sum() > 0  # H~ is still there
    # a call one stream made and the other did not: unpaired as well
    other = _stats(module, cross_term=True)
    accumulate_batch({module: other}, {module: [torch.randn(3, WIDTH)] * 2}, {module: [torch.randn(3, WIDTH)]})
    assert not other.paired


def test_a_module_called_twice_pairs_call_by_call():
    module = torch.nn.Linear(WIDTH, 4)
    full_precision, quantized = _batches(2, count=2)
    both = _stats(module, cross_term=True)
    accumulate_batch({module: both}, {module: quantized}, {module: full_precision})
    separate = _stats(module, cross_term=True)
    for x, x_q in zip(full_precision, quantized):
        accumulate_batch({module: separate}, {module: [x_q]}, {module: [x]})
    assert torch.equal(both.cross_term, separate.cross_term)
    assert both.num_samples.item() == 2


def test_statistics_of_disjoint_batches_add_up_exactly():
    module = torch.nn.Linear(WIDTH, 4)
    full_precision, quantized = _batches(3, count=2)
    whole = _stats(module, cross_term=True, full_precision_gram=True)
    halves = [_stats(module, cross_term=True, full_precision_gram=True) for _ in range(2)]
    for x, x_q, half in zip(full_precision, quantized, halves):
        accumulate_batch({module: whole}, {module: [x_q]}, {module: [x]})
        accumulate_batch({module: half}, {module: [x_q]}, {module: [x]})
    halves[0].add(halves[1])
    for name in ("hessian", "num_samples", "cross_term", "full_precision_gram"):
        assert torch.equal(getattr(halves[0], name), getattr(whole, name)), name
    assert halves[0].tokens == whole.tokens
    unpaired = _stats(module, cross_term=True)
    unpaired.unpair()
    halves[0].add(unpaired)
    assert not halves[0].paired and halves[0].cross_term is None


def test_an_unrouted_call_counts_no_token():
    module = torch.nn.Linear(WIDTH, 4)
    stats = _stats(module)
    accumulate_batch({module: stats}, {module: [torch.zeros(0, WIDTH)]})
    assert stats.tokens == 0 and stats.hessian.abs().sum() == 0


def test_minus_leaves_the_other_batches():
    module = torch.nn.Linear(WIDTH, 4)
    full_precision, quantized = _batches(5, count=2)
    whole = _stats(module, cross_term=True, full_precision_gram=True)
    first, second = (_stats(module, cross_term=True, full_precision_gram=True) for _ in range(2))
    for index, (x, x_q) in enumerate(zip(full_precision, quantized)):
        accumulate_batch({module: whole}, {module: [x_q]}, {module: [x]})
        accumulate_batch({module: (first, second)[index]}, {module: [x_q]}, {module: [x]})
    rest = whole.minus(second)
    for name in ("hessian", "cross_term", "full_precision_gram"):
        torch.testing.assert_close(getattr(rest, name), getattr(first, name), rtol=1e-5, atol=1e-5)
    assert rest.num_samples.item() == 1 and rest.tokens == first.tokens


def _cross_streams(tokens=400, width=24, noise=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    full_precision = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    quantized = full_precision + noise * torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    return full_precision, quantized


def test_cross_term_matches_direct_formula():
    full_precision, quantized = _cross_streams()
    cross = torch.zeros(24, 24, dtype=torch.float64)
    for start in range(0, 400, 100):  # four "batches"
        accumulate_cross_term(full_precision[start : start + 100], quantized[start : start + 100], cross)
    expected = 2.0 * (full_precision - quantized).t() @ quantized
    torch.testing.assert_close(cross, expected, rtol=1e-12, atol=1e-12)


def test_cross_term_accepts_batched_inputs_and_rejects_mismatch():
    full_precision, quantized = _cross_streams(tokens=60)
    flat = torch.zeros(24, 24, dtype=torch.float64)
    batched = torch.zeros(24, 24, dtype=torch.float64)
    accumulate_cross_term(full_precision, quantized, flat)
    accumulate_cross_term(
        full_precision.reshape(3, 20, 24), quantized.reshape(3, 20, 24), batched
    )
    torch.testing.assert_close(flat, batched)
    with pytest.raises(ValueError, match="same tokens"):
        accumulate_cross_term(full_precision[:10], quantized[:11], flat)
