"""The pipeline's propagation pass, resumed from QEP's last replay.

After a subgraph is calibrated, llm-compressor's sequential pipeline runs each
of its layers once more on every batch, hooks off, to get the quantized
layer's output for the next subgraph: all of the layer's Linears again. By then
QEP's last replay (the one up to the last group's input, e.g. ``down_proj``'s)
has computed everything before that input with the final weights: it keeps the
attention block's output (or q, k, v and o's, where the layer reads more of the
attention block than its output) and the last Linear's input. So the layer's
output costs one product: the last Linear on its kept input stands for the
module that returns it (the MLP), and the layer runs with that and the kept
outputs (its norms and residual adds recomputed).
:class:`~qep_modifier.layer_forwards.PropagatedOutputs` then hands the pipeline
those outputs in place of its forward.

Only where it is the same computation: a last group of one Linear called once
per batch, inside a module (not the layer itself) that returns that Linear's
output as it is, and nothing tuned after the replays. Batch 0 checks it: its
whole forward runs too, the module must return the Linear's output object, and
the resumed output must equal the whole one bit for bit; otherwise every batch
runs whole. A call of the layer whose hidden state is not the one expected runs
the real forward, and so does every later one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from compressed_tensors.offload.utils import send_tensors
from llmcompressor.modifiers.utils.hooks import HooksMixin

__all__ = ["LastLinear", "last_linear", "resumed_outputs", "same_output"]


class LastLinear:
    """The layer's last quantized Linear and the module that returns its output."""

    def __init__(self, linear: torch.nn.Module, returned_by: torch.nn.Module):
        self.linear, self.returned_by = linear, returned_by
        self.inside = set(returned_by.modules())
        # batch -> (the Linear's kept input, its version when kept)
        self.inputs: dict[int, tuple[torch.Tensor, int]] = {}

    def keep(self, batch: int, captured: list[torch.Tensor]) -> bool:
        """Keep batch ``batch``'s input of the Linear (one call); whether it was one."""
        if len(captured) != 1:
            return False
        self.inputs[batch] = (captured[0], captured[0]._version)
        return True

    def output(self, batch: int, device) -> torch.Tensor | None:
        """The Linear's output on batch ``batch``'s kept input (hooks off), or
        ``None`` when it has none or the input changed since."""
        inp, version = self.inputs.pop(batch, (None, None))
        if inp is None or inp._version != version:
            return None
        with HooksMixin.disable_hooks():
            return self.linear(inp.to(device))


def last_linear(layer: torch.nn.Module, modules: Collection[torch.nn.Module]) -> LastLinear | None:
    """The :class:`LastLinear` of a last group of ``modules``: one Linear whose
    parent is not ``layer`` (``None`` otherwise)."""
    if len(modules) != 1:
        return None
    (linear,) = modules
    parents = [m for m in layer.modules() if m is not layer and any(c is linear for c in m.children())]
    if len(parents) != 1:
        return None
    return LastLinear(linear, parents[0])


def same_output(a: Any, b: Any) -> bool:
    """Whether two layer outputs are the same structure with bit-equal tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b.to(a.device))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b))
    return a is b or a == b


def _returned_as_is(run: Callable[[], Any], last: LastLinear) -> tuple[Any, bool]:
    """Run a whole forward; whether ``last.returned_by`` returned ``last.linear``'s
    output object, each called once."""
    outputs: dict[torch.nn.Module, list[Any]] = {last.linear: [], last.returned_by: []}
    handles = [
        module.register_forward_hook(lambda module, args, output: outputs[module].append(output))
        for module in outputs
    ]
    try:
        output = run()
    finally:
        for handle in handles:
            handle.remove()
    linear_outputs, returned = outputs[last.linear], outputs[last.returned_by]
    as_is = len(linear_outputs) == 1 and len(returned) == 1 and returned[0] is linear_outputs[0]
    return output, as_is


def resumed_outputs(
    whole_pass,
    resumed_pass,
    batches: Iterator[tuple],
    kept: dict[int, dict],
    last: LastLinear,
    offload_device,
) -> list[Any] | None:
    """Each batch's output of the quantized layer, resumed (module docstring), or
    ``None`` where batch 0 shows the resumed forward is not the whole one.

    ``whole_pass`` / ``resumed_pass``: :class:`~qep_modifier.capture.LayerPass`
    es without and with the replay's ``kept`` outputs (batch -> module ->
    entries); ``batches``: the layer's quantized-stream calls ``(batch, args,
    kwargs, hidden)``."""
    outputs = []
    for position, call in enumerate(batches):
        batch, whole = call[0], None
        if position == 0:
            whole, as_is = _returned_as_is(lambda: whole_pass.run(*call)[1], last)
            if not as_is:
                return None
        linear_output = last.output(batch, last.linear.weight.device)
        if linear_output is None:
            return None
        kept.setdefault(batch, {})[last.returned_by] = [(linear_output, [linear_output._version])]
        output = resumed_pass.run(*call)[1]
        if whole is not None and not same_output(whole, output):
            return None
        outputs.append(send_tensors(output, offload_device) if offload_device is not None else output)
    return outputs
