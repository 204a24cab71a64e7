"""DualStreamCapture on toy modules: pairing rules the models in the other tests
do not reach (routing, shared modules, tuple outputs)."""

import pytest
import torch

from qep_modifier.streams import FULL_PRECISION, DualStreamCapture


def _capture(layer, linear, pairs, **kwargs):
    return DualStreamCapture(
        layers=[layer],
        linear_layer={linear: layer},
        on_quantized_input=lambda module, x: None,
        on_input_pair=lambda module, x, x_q: pairs.append((x, x_q)),
        **kwargs,
    )


def test_differently_routed_streams_are_not_paired():
    layer, linear = torch.nn.Identity(), torch.nn.Linear(4, 4)
    pairs, unpaired = [], []
    capture = DualStreamCapture(
        layers=[layer],
        linear_layer={linear: layer},
        on_quantized_input=lambda module, x: None,
        on_input_pair=lambda module, x, x_q: pairs.append(module),
        on_unpaired=unpaired.append,
    )
    capture.linear_input(linear, torch.randn(3, 4))  # quantized stream: 3 tokens routed here
    with capture._stream("full_precision"):
        capture.linear_input(linear, torch.randn(5, 4))  # full precision: 5 tokens
    assert pairs == [] and unpaired == [linear]
    # without the callback it is an error, not a silent mis-pairing
    strict = DualStreamCapture(
        layers=[layer], linear_layer={linear: layer},
        on_quantized_input=lambda module, x: None, on_input_pair=lambda module, x, x_q: None,
    )
    strict.linear_input(linear, torch.randn(3, 4))
    with strict._stream("full_precision"), pytest.raises(RuntimeError, match="different tokens"):
        strict.linear_input(linear, torch.randn(5, 4))


def test_a_linear_called_twice_pairs_call_by_call():
    layer, shared = torch.nn.Identity(), torch.nn.Linear(4, 4)
    pairs = []
    capture = _capture(layer, shared, pairs, on_unpaired=lambda module: pytest.fail("unpaired"))
    quantized = [torch.randn(2, 4), torch.randn(2, 4)]
    full_precision = [torch.randn(2, 4), torch.randn(2, 4)]
    for x_q in quantized:
        capture.linear_input(shared, x_q)
    with capture._stream(FULL_PRECISION):
        for x in full_precision:
            capture.linear_input(shared, x)
    assert len(pairs) == 2
    for (x, x_q), expected_x, expected_x_q in zip(pairs, full_precision, quantized):
        assert x is expected_x and x_q is expected_x_q


class _TupleLayer(torch.nn.Module):
    """A decoder layer that returns ``(hidden, attention weights)``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden):
        return self.proj(hidden) * 2, torch.ones(1)


def test_a_layer_returning_a_tuple_hands_its_hidden_state_on():
    first, second = _TupleLayer(), _TupleLayer()
    pairs = []
    capture = DualStreamCapture(
        layers=[first, second],
        linear_layer={first.proj: first, second.proj: second},
        on_quantized_input=lambda module, x: None,
        on_input_pair=lambda module, x, x_q: pairs.append((module, x, x_q)),
    )
    for layer in (first, second):
        layer.proj.register_forward_hook(lambda module, args, out: capture.linear_input(module, args[0]))
        layer.register_forward_hook(
            lambda module, args, kwargs, out: capture.layer_output(module, args, kwargs, out, 0),
            with_kwargs=True,
        )
    hidden = torch.randn(3, 4)
    with torch.no_grad():
        output, _ = first(hidden)
        second(output + 1.0)  # the quantized stream drifted
    (_, x0, x0_q), (module, x1, x1_q) = pairs
    assert torch.equal(x0, hidden) and torch.equal(x0_q, hidden)
    # the second layer's full-precision input is the first layer's hidden output
    assert module is second.proj
    assert torch.equal(x1, output) and torch.equal(x1_q, output + 1.0)
