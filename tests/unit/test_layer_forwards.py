"""Layers whose forward is swapped for one of the pipeline's passes, and a layer
call's hidden state, on toy modules (no pipeline)."""

import functools

import pytest
import torch

from qep_modifier.layer_forwards import (
    PropagatedOutputs,
    SkippedCalibration,
    first_tensor,
    replace_hidden,
    split_hidden,
)
from tests.models import ToyMlpLayer

WIDTH = 8


def _swapped(layer) -> bool:
    return isinstance(layer.__dict__.get("forward"), functools.partial)


def test_skipped_calibration_returns_the_input_after_the_first_call_until_removed():
    torch.manual_seed(0)
    layer, skipped = ToyMlpLayer(), SkippedCalibration()
    skipped.install(layer)
    first, second = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(layer(first), first + layer.mlp(first))
        assert layer(second) is second
        assert skipped.remove(layer) and not skipped.remove(layer)
        assert not _swapped(layer) and torch.equal(layer(second), second + layer.mlp(second))


def test_skipped_calibration_keeps_a_tuple_output_shape():
    class TupleLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(WIDTH, WIDTH)

        def forward(self, hidden):
            return self.proj(hidden), None

    layer, skipped = TupleLayer(), SkippedCalibration()
    skipped.install(layer)
    layer(torch.randn(2, WIDTH))
    hidden = torch.randn(2, WIDTH)
    output = layer(hidden)
    assert isinstance(output, tuple) and output[0] is hidden and output[1] is None
    skipped.remove_all()
    assert layer(hidden)[0] is not hidden


def test_hidden_state_helpers():
    hidden, other = torch.randn(2), torch.randn(2)
    assert split_hidden((hidden, 1), {"a": 2}) == (hidden, (1,), {"a": 2})
    assert split_hidden((), {"hidden_states": hidden, "a": 2})[0] is hidden
    with pytest.raises(ValueError, match="hidden state"):
        split_hidden((), {"a": 2})
    assert replace_hidden((hidden, 1), {}, other)[0] == (other, 1)
    assert replace_hidden((), {"hidden_states": hidden}, other)[1]["hidden_states"] is other
    assert first_tensor((hidden, None)) is hidden and first_tensor(hidden) is hidden
    with pytest.raises(TypeError, match="hidden state"):
        first_tensor({"x": hidden})


def test_propagated_outputs_hand_back_what_was_computed_then_the_real_forward():
    torch.manual_seed(0)
    layer = ToyMlpLayer()
    inputs = [torch.randn(2, 4) for _ in range(2)]
    stored = [torch.full((2, 4), 7.0), torch.full((2, 4), 8.0)]
    propagated = PropagatedOutputs()
    propagated.install(layer, inputs, stored)
    assert _swapped(layer)
    assert torch.equal(layer(inputs[0].clone()), stored[0])
    assert torch.equal(layer(hidden_states=inputs[1].clone()), stored[1])
    assert not _swapped(layer)  # after the last expected call: the real forward again
    with torch.no_grad():
        real = inputs[0] + layer.mlp(inputs[0])
    assert torch.equal(layer(inputs[0]), real)


def test_a_call_out_of_step_runs_the_real_forward_from_then_on():
    torch.manual_seed(0)
    layer = ToyMlpLayer()
    inputs = [torch.randn(2, 4) for _ in range(2)]
    propagated = PropagatedOutputs()
    propagated.install(layer, inputs, [torch.zeros(2, 4), torch.zeros(2, 4)])
    with torch.no_grad():
        real = inputs[1] + layer.mlp(inputs[1])
        assert torch.equal(layer(inputs[1]), real)  # batch 1 first: not the expected input
        assert not _swapped(layer)
        assert torch.equal(layer(inputs[0]), inputs[0] + layer.mlp(inputs[0]))
    propagated.install(layer, inputs, [torch.zeros(2, 4)] * 2)
    propagated.remove_all()
    assert not _swapped(layer)
