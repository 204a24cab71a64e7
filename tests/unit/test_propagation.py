"""The resumed propagation's pieces on toy modules (no pipeline): which Linear
stands for which module, the bit-for-bit output check, and the layer forwards
that hand back outputs computed already."""

import functools

import torch

from qep_modifier.propagation import LastLinear, PropagatedOutputs, last_linear, same_output


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp, self.out = _Mlp(), torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states + self.mlp(hidden_states)


def _swapped(layer) -> bool:
    return isinstance(layer.__dict__.get("forward"), functools.partial)


def test_last_linear_is_one_linear_inside_a_module_of_the_layer():
    torch.manual_seed(0)
    layer = _Layer()
    last = last_linear(layer, [layer.mlp.down])
    assert isinstance(last, LastLinear) and last.linear is layer.mlp.down and last.returned_by is layer.mlp
    assert last.inside == {layer.mlp, layer.mlp.up, layer.mlp.down}
    assert last_linear(layer, [layer.mlp.down, layer.mlp.up]) is None  # a group of two
    assert last_linear(layer, [layer.out]) is None  # the layer itself would return it


def test_last_linear_keeps_one_input_per_batch_and_drops_a_changed_one():
    torch.manual_seed(0)
    layer = _Layer()
    last = last_linear(layer, [layer.mlp.down])
    x = torch.randn(3, 8)
    assert not last.keep(0, [x, x])  # called twice: no single input
    assert last.keep(0, [x]) and last.keep(1, [x.clone()])
    torch.testing.assert_close(last.output(0, x.device), layer.mlp.down(x), rtol=0, atol=0)
    assert last.output(0, x.device) is None  # used once
    last.inputs[1][0].add_(1.0)  # written after it was kept
    assert last.output(1, x.device) is None


def test_same_output_is_structure_and_bits():
    a = torch.randn(2, 3)
    assert same_output(a, a.clone()) and same_output((a, None), (a.clone(), None))
    assert not same_output(a, a.double())
    assert not same_output(a, a + 1e-7 * a.abs().max())
    assert not same_output((a,), (a, a)) and not same_output((a,), [a]) and not same_output(a, (a,))


def test_propagated_outputs_hand_back_what_was_computed_then_the_real_forward():
    torch.manual_seed(0)
    layer = _Layer()
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
    layer = _Layer()
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
