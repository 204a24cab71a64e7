"""The resumed propagation's pieces on toy modules (no pipeline): which Linear
stands for which module and the bit-for-bit output check."""

import torch

from qep_modifier.propagation import LastLinear, last_linear, same_output
from tests.models import ToyMlpLayer


def test_last_linear_is_one_linear_inside_a_module_of_the_layer():
    torch.manual_seed(0)
    layer = ToyMlpLayer()
    last = last_linear(layer, [layer.mlp.down])
    assert isinstance(last, LastLinear) and last.linear is layer.mlp.down and last.returned_by is layer.mlp
    assert last.inside == {layer.mlp, layer.mlp.up, layer.mlp.down}
    assert last_linear(layer, [layer.mlp.down, layer.mlp.up]) is None  # a group of two
    assert last_linear(layer, [layer.out]) is None  # the layer itself would return it


def test_last_linear_keeps_one_input_per_batch_and_drops_a_changed_one():
    torch.manual_seed(0)
    layer = ToyMlpLayer()
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
