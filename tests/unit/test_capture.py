"""Stream capture on a toy decoder layer: recording, traced passes, early stops,
resumed replays, silenced hooks and both streams group by group (no oneshot)."""

import functools

import pytest
import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin

from qep_modifier.capture import LayerPass, RecordedCalls, ReplayOutputs, probe_layer
from qep_modifier.layer_forwards import SkippedCalibration
from qep_modifier.propagation import last_linear

WIDTH = 8


class ToyAttention(torch.nn.Module):
    """With ``probabilities``, returns ``(output, probabilities)`` as a
    transformers attention block does under eager attention."""

    def __init__(self, probabilities=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.probabilities, self.calls = probabilities, 0

    def forward(self, x):
        self.calls += 1  # a kept output returned in its place does not count
        weights = torch.tanh(self.q(x) * self.k(x))
        output = self.o(weights + self.v(x))
        return (output, weights) if self.probabilities else output


class ToyMLP(torch.nn.Module):
    def __init__(self, down_twice=False):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(WIDTH, 16), torch.nn.Linear(WIDTH, 16)
        self.down = torch.nn.Linear(16, WIDTH)
        self.down_twice = down_twice

    def forward(self, x):
        inner = torch.nn.functional.silu(self.gate(x)) * self.up(x)
        return self.down(inner) + self.down(0.5 * inner) if self.down_twice else self.down(inner)


class ToyLayer(torch.nn.Module):
    """norm -> attention -> residual -> norm -> MLP -> residual."""

    def __init__(self, in_place=False, probabilities=False, reads_probabilities=None, down_twice=False):
        """``reads_probabilities``: ``"adds"`` them to the attention output,
        ``"returns"`` them beside the layer's output."""
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.attn, self.mlp = ToyAttention(probabilities), ToyMLP(down_twice)
        self.in_place, self.reads_probabilities = in_place, reads_probabilities

    def forward(self, hidden, scale=1.0):
        attended, weights = self.attn(self.norm1(hidden)), None
        if isinstance(attended, tuple):
            attended, weights = attended
            if self.reads_probabilities == "adds":
                attended = attended + weights
        if self.in_place:
            attended.add_(hidden)  # writes the attention block's output in place
            h = attended
        else:
            h = hidden + attended
        output = h + scale * self.mlp(self.norm2(h))
        return (output, weights) if self.reads_probabilities == "returns" else output


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ToyLayer(**kwargs).eval()


def _linears(layer):
    return [layer.attn.q, layer.attn.k, layer.attn.v, layer.attn.o, layer.mlp.gate, layer.mlp.up, layer.mlp.down]


class Owner(HooksMixin):
    """Stands in for the modifier whose hooks a pass registers."""


@pytest.fixture
def computed(monkeypatch):
    """Count each Linear's products (a kept output returned by a swapped forward
    still fires the module's hooks, so hooks cannot count computations)."""
    counts = {}
    linear = torch.nn.functional.linear

    def counting(inp, weight, bias=None):
        counts[weight.data_ptr()] = counts.get(weight.data_ptr(), 0) + 1
        return linear(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)

    def of(layer):
        return {
            module: counts[module.weight.data_ptr()]
            for module in _linears(layer)
            if module.weight.data_ptr() in counts
        }

    return of


def test_recorded_calls_come_back_onloaded_per_batch():
    layer = _layer()
    calls = RecordedCalls("cpu")
    hidden = [torch.randn(1, 3, WIDTH) for _ in range(2)]
    shared = torch.ones(3)
    for batch in hidden:
        calls.record(layer, (batch,), {"scale": 0.5, "mask": shared})
    assert calls.num_batches(layer) == 2 and len(calls) == 1
    args, kwargs = calls.fetch(layer, 1)
    assert torch.equal(args[0], hidden[1]) and kwargs["scale"] == 0.5
    assert torch.equal(kwargs["mask"], shared)
    calls.drop(layer)
    assert calls.num_batches(layer) == 0


def test_trace_keys_name_shared_inputs():
    layer = _layer()
    with LayerPass(Owner(), layer, _linears(layer), capture=_linears(layer)) as traced:
        captured, output = traced.run(0, (torch.randn(1, 3, WIDTH),), {})
    keys = {call.module: call.input_key for call in traced.trace}
    q, k, v, o, gate, up, down = _linears(layer)
    assert keys[q] == keys[k] == keys[v] != keys[o]
    assert keys[gate] == keys[up] != keys[down]
    assert captured[q][0] is captured[k][0]  # one private copy for a shared input
    assert output is not None


def test_a_pass_stops_at_its_call_and_computes_nothing_after(computed):
    layer = _layer()
    q, k, v, o, gate, up, down = _linears(layer)
    hidden = torch.randn(1, 3, WIDTH)
    with LayerPass(Owner(), layer, _linears(layer), capture=[o], stop=(o, 0)) as replay:
        captured, output = replay.run(0, (hidden,), {})
    assert output is None and set(captured) == {o}
    assert computed(layer) == {q: 1, k: 1, v: 1}  # o never computed, nor anything after
    expected = torch.tanh(q(layer.norm1(hidden)) * k(layer.norm1(hidden))) + v(layer.norm1(hidden))
    torch.testing.assert_close(captured[o][0], expected)


def test_hidden_state_is_replaced_and_kwargs_kept():
    layer = _layer()
    recorded, replacement = torch.randn(1, 3, WIDTH), torch.randn(1, 3, WIDTH)
    with LayerPass(Owner(), layer, _linears(layer)) as plain:
        _, output = plain.run(0, (recorded,), {"scale": 0.0}, hidden=replacement)
    torch.testing.assert_close(output, replacement + layer.attn(layer.norm1(replacement)))


def test_other_hooks_are_silenced_while_a_pass_runs():
    layer = _layer()
    other, fired = Owner(), []
    other.register_hook(layer.attn.q, lambda *args: fired.append(1), "forward")
    other.register_hook(layer, lambda *args: fired.append(2), "forward_pre")
    with LayerPass(Owner(), layer, _linears(layer)) as plain:
        plain.run(0, (torch.randn(1, 3, WIDTH),), {})
    assert fired == []
    layer(torch.randn(1, 3, WIDTH))
    assert fired == [2, 1]  # and they fire again afterwards
    other.remove_hooks()


def _replays(layer, replay, hidden):
    """The three later groups' replays (o, gate/up, down), each after the groups
    before it are final; returns what each captured."""
    q, k, v, o, gate, up, down = _linears(layer)
    steps = [([o], (o, 0), [q, k, v]), ([gate, up], (gate, 0), [q, k, v, o]), ([down], (down, 0), [q, k, v, o, gate, up])]
    captured = []
    for number, (capture, stop, final) in enumerate(steps):
        with LayerPass(
            Owner(), layer, _linears(layer), capture=capture, stop=stop,
            replay=replay, final=final, keep_outputs=number < 2,
        ) as step:
            captured.append([step.run(batch, (x,), {})[0] for batch, x in enumerate(hidden)])
    names = {module: name for name, module in layer.named_modules()}
    return [[{names[m]: inputs for m, inputs in batch.items()} for batch in step] for step in captured]


def _assert_same_inputs(got_steps, expected_steps):
    """Every replay's inputs, batch by batch and Linear by Linear, bit for bit."""
    assert len(got_steps) == len(expected_steps)
    for got, expected in zip(got_steps, expected_steps):
        for batch_got, batch_expected in zip(got, expected, strict=True):
            assert batch_got.keys() == batch_expected.keys()
            for name in batch_expected:
                assert torch.equal(batch_got[name][0], batch_expected[name][0])

def test_replays_resume_from_the_submodules_the_previous_one_finished(computed):
    hidden = [torch.randn(1, 3, WIDTH) for _ in range(2)]
    unresumed = _layer()  # kept alive: products are counted by weight address
    fresh = _replays(unresumed, None, hidden)
    layer = _layer()
    replay = ReplayOutputs(layer, _linears(layer), "cpu")
    resumed = _replays(layer, replay, hidden)
    _assert_same_inputs(resumed, fresh)
    q, k, v, o, gate, up, down = _linears(layer)
    # q k v computed once per batch (replay for o), o once (for gate/up: q k v
    # kept), gate and up once (for down: q k v o kept)
    assert computed(layer) == {q: 2, k: 2, v: 2, o: 2, gate: 2, up: 2}
    assert replay.kept == {}  # the last replay used and dropped them


def test_an_output_written_in_place_is_not_kept(computed):
    hidden = [torch.randn(1, 3, WIDTH)]
    unresumed = _layer(in_place=True)
    fresh = _replays(unresumed, None, [h.clone() for h in hidden])
    layer = _layer(in_place=True)
    resumed = _replays(layer, ReplayOutputs(layer, _linears(layer), "cpu"), hidden)
    assert torch.equal(resumed[2][0]["mlp.down"][0], fresh[2][0]["mlp.down"][0])
    # the attention block's output was written in place: recomputed for down
    assert computed(layer)[layer.attn.o] == 2


def test_a_final_linear_is_not_kept_while_a_later_group_computes_inside_its_parent():
    layer = _layer()
    q, k, v, o, gate, up, down = _linears(layer)
    replay = ReplayOutputs(layer, _linears(layer), "cpu")
    # a pass with q final and k, v not: only q's output may be kept
    with LayerPass(
        Owner(), layer, _linears(layer), capture=[o], stop=(o, 0),
        replay=replay, final=[q], keep_outputs=True,
    ) as step:
        step.run(0, (torch.randn(1, 3, WIDTH),), {})
    assert set(replay.kept[0]) == {q}


def test_the_probe_finds_the_tuples_the_layer_reads_the_first_of():
    hidden = torch.randn(1, 3, WIDTH)

    def first_only(**kwargs):
        layer = _layer(**kwargs)
        with torch.no_grad():
            return probe_layer(lambda: layer(hidden), list(layer.modules())[1:]).first_only, layer

    ignored, layer = first_only(probabilities=True)
    assert ignored == {layer.attn}
    assert first_only(probabilities=True, reads_probabilities="adds")[0] == set()  # fails on a None
    assert first_only(probabilities=True, reads_probabilities="returns")[0] == set()  # another output
    assert first_only()[0] == set()  # nothing returns a tuple


@pytest.mark.parametrize("probabilities", [False, True])
def test_the_probe_finds_the_modules_that_return_a_linears_output_as_it_is(probabilities):
    layer, hidden = _layer(probabilities=probabilities), torch.randn(1, 3, WIDTH)
    o, down = last_linear(layer, [layer.attn.o]), last_linear(layer, [layer.mlp.down])
    with torch.no_grad():
        probe = probe_layer(lambda: layer(hidden), list(layer.modules())[1:], [o, down])
    # the attention block returns o's output (first of two with its probabilities)
    assert probe.returning == {o: 2 if probabilities else 0, down: 0}
    twice = _layer(down_twice=True)
    down = last_linear(twice, [twice.mlp.down])
    with torch.no_grad():
        assert probe_layer(lambda: twice(hidden), list(twice.modules())[1:], [down]).returning == {}


@pytest.mark.parametrize("reads_probabilities", [None, "adds", "returns"])
def test_an_attention_block_is_kept_without_its_probabilities_only_where_the_layer_ignores_them(reads_probabilities):
    hidden = [torch.randn(1, 3, WIDTH) for _ in range(2)]
    fresh = _replays(_layer(probabilities=True, reads_probabilities=reads_probabilities), None, hidden)
    layer = _layer(probabilities=True, reads_probabilities=reads_probabilities)
    replay = ReplayOutputs(layer, _linears(layer), "cpu")
    with torch.no_grad():
        replay.first_only = set(probe_layer(lambda: layer(hidden[0]), replay.candidates).first_only)
    layer.attn.calls = 0
    resumed = _replays(layer, replay, hidden)
    _assert_same_inputs(resumed, fresh)
    # per batch: computed for o and for gate/up; for down only where its
    # probabilities matter (else kept whole from gate/up's replay)
    assert layer.attn.calls == 2 * (3 if reads_probabilities else 2)


def test_weights_override_computes_with_the_given_weight():
    layer = _layer()
    q, k, v, o, gate, up, down = _linears(layer)
    original = q.weight.detach().clone()
    hidden = torch.randn(1, 3, WIDTH)
    with LayerPass(Owner(), layer, _linears(layer), capture=[o], stop=(o, 0)) as before:
        expected = before.run(0, (hidden,), {})[0][o][0]
    with torch.no_grad():
        q.weight.mul_(3.0)
    with LayerPass(Owner(), layer, _linears(layer), capture=[o], stop=(o, 0), weights={q: original}) as pass_:
        got = pass_.run(0, (hidden,), {})[0][o][0]
    assert torch.equal(got, expected)
    assert "forward" not in q.__dict__ or not isinstance(q.__dict__["forward"], functools.partial)


def test_skipped_calibration_computes_the_first_batch_only(computed):
    layer = _layer()
    skipped = SkippedCalibration()
    skipped.install(layer)
    first, second = torch.randn(1, 3, WIDTH), torch.randn(1, 3, WIDTH)
    real = layer(first)
    assert sum(computed(layer).values()) == 7
    assert layer(second) is second and sum(computed(layer).values()) == 7
    assert skipped.remove(layer) and not skipped.remove(layer)
    torch.testing.assert_close(layer(first), real)


def _plan(layer, hidden, paired):
    from qep_modifier.plan import plan_layer

    with LayerPass(Owner(), layer, _linears(layer), capture=_linears(layer)) as traced:
        traced.run(0, (hidden,), {})
    names = {module: name for name, module in layer.named_modules()}
    return plan_layer(
        traced.trace, _linears(layer), role=lambda m: names[m], paired=lambda m: names[m] in paired
    )


def _streams(layer, quantized_hidden, full_precision_hidden, cache=True, resume=True):
    from qep_modifier.capture import LayerStreams

    calls = RecordedCalls(None)
    for hidden in quantized_hidden:
        calls.record(layer, (hidden,), {"scale": 0.5})
    plan = _plan(layer, quantized_hidden[0], paired={"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate"})
    streams = LayerStreams(
        Owner(), layer, _linears(layer),
        lambda: ((b, *calls.fetch(layer, b)) for b in range(len(quantized_hidden))),
        quantized_hidden=None, full_precision_hidden=list(full_precision_hidden), plan=plan,
        stream_needed=True, cache_full_precision=cache, resume=resume, offload_device="cpu",
        last=last_linear(layer, plan.groups[-1].modules),
    )
    return streams, plan


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("resume", [True, False])
def test_layer_streams_feed_each_group_both_streams(cache, resume, probabilities):
    layer, original = _layer(probabilities=probabilities), _layer(probabilities=probabilities)
    quantized_hidden = [torch.randn(1, 3, WIDTH) for _ in range(2)]
    full_precision_hidden = [h + 0.1 * torch.randn(1, 3, WIDTH) for h in quantized_hidden]
    streams, plan = _streams(layer, quantized_hidden, full_precision_hidden, cache, resume)
    names = {module: name for name, module in layer.named_modules()}
    for number, group in enumerate(plan.groups):
        members = [names[m] for m in group.modules]
        # what a fresh model gives: this layer as it is now (earlier groups
        # changed below) on the quantized stream, the original on the other
        expected_quantized = {name: [] for name in members}
        expected_full = {name: [] for name in members}
        for hidden, fp_hidden in zip(quantized_hidden, full_precision_hidden):
            for model, feed, expected in ((layer, hidden, expected_quantized), (original, fp_hidden, expected_full)):
                handles = [
                    model.get_submodule(name).register_forward_pre_hook(
                        lambda module, args, name=name, expected=expected: expected[name].append(args[0])
                    )
                    for name in members
                ]
                with torch.no_grad():
                    model(feed, scale=0.5)
                for handle in handles:
                    handle.remove()
        seen = list(streams.inputs(group))
        assert len(seen) == 2
        for batch, (x_q, x) in enumerate(seen):
            for module in group.modules:
                torch.testing.assert_close(x_q[module][0], expected_quantized[names[module]][batch])
                if group.paired:
                    torch.testing.assert_close(x[module][0], expected_full[names[module]][batch])
                else:
                    assert x is None
        streams.quantizing(group)
        with torch.no_grad():  # "quantize" the group: its weights change
            for module in group.modules:
                module.weight.add_(0.05 * torch.randn_like(module.weight))
    next_stream = streams.finish()
    with torch.no_grad():
        for fp_hidden, got in zip(full_precision_hidden, next_stream):
            torch.testing.assert_close(got, original(fp_hidden, scale=0.5))
        for hidden, got in zip(quantized_hidden, streams.propagate()):
            torch.testing.assert_close(got, layer(hidden, scale=0.5))
        # the quantized layer's outputs resumed from the last replay, bit for bit
        resumed = streams.outputs()
        assert (resumed is None) == (not resume)
        for hidden, got in zip(quantized_hidden, resumed or []):
            assert torch.equal(got, layer(hidden, scale=0.5))


@pytest.mark.parametrize("probabilities", [False, True])
def test_layer_streams_compute_the_attention_in_no_replay_after_os(probabilities):
    layer = _layer(probabilities=probabilities)
    quantized_hidden = [torch.randn(1, 3, WIDTH) for _ in range(2)]
    streams, plan = _streams(layer, quantized_hidden, [h + 0.1 for h in quantized_hidden])
    entered = []
    for group in plan.groups:
        layer.attn.calls = 0
        assert len(list(streams.inputs(group))) == 2
        entered.append(layer.attn.calls)
        streams.quantizing(group)
    # q k v's group: the probe (once more with the probabilities dropped), the
    # full-precision pass and the replay (stopped at q); o's replay; then none:
    # gate and up's replay gets the attention block's output from o on its kept
    # input, down's keeps it
    assert [len(group.modules) for group in plan.groups] == [3, 1, 2, 1]
    assert entered == [(2 if probabilities else 1) + 2 + 2, 2, 0, 0]


def test_a_last_linear_called_twice_keeps_nothing_for_the_propagation_pass():
    layer = _layer(down_twice=True)
    quantized_hidden = [torch.randn(1, 3, WIDTH) for _ in range(3)]
    streams, plan = _streams(layer, quantized_hidden, [h.clone() for h in quantized_hidden])
    assert streams.last is not None  # one Linear inside the MLP, which returns a sum
    for group in plan.groups:
        assert len(list(streams.inputs(group))) == 3
        streams.quantizing(group)
    # down's two inputs per batch: batch 0 gave up keeping, and no later batch kept
    assert streams.last is None and streams.replay.kept == {}
    assert streams.outputs() is None
