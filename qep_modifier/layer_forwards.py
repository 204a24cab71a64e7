"""A decoder layer's calls, and layers whose forward is swapped for one of the pipeline's passes.

llm-compressor's sequential pipeline runs each layer twice per batch: a
calibration pass (hooks on) and a propagation pass (for the next layer's
input). QEP computes what it needs itself (:mod:`qep_modifier.capture`), so it
may stand in for parts of both passes by swapping the layer's ``forward``
(``compressed_tensors.utils.patch_attr``) until the pass is over:

- :class:`SkippedCalibration`: only the calibration pass's first batch is
  computed, when nothing but QEP reads that pass;
- :class:`PropagatedOutputs`: the propagation pass gets outputs QEP computed
  already (:mod:`qep_modifier.propagation`).

Both restore the real forward at the first call they cannot answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from compressed_tensors.offload.utils import send_tensors
from compressed_tensors.utils import patch_attr

__all__ = [
    "PropagatedOutputs",
    "SkippedCalibration",
    "SwappedForwards",
    "first_tensor",
    "replace_hidden",
    "split_hidden",
]


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Separate a layer call's hidden state from its other arguments."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise ValueError(
        "QEP: a sequential target was called without a positional hidden state or "
        "a `hidden_states` keyword; QEP cannot find its input"
    )


def replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with ``hidden`` as its hidden state."""
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    split_hidden(args, kwargs)  # raises if there is none
    return (), {**kwargs, "hidden_states": hidden}


def first_tensor(output: Any) -> torch.Tensor:
    """A layer output's hidden state: the tensor, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"QEP: a sequential target returned {type(output).__name__}; expected a "
        "tensor or a tuple whose first element is the hidden state"
    )


class SwappedForwards:
    """Layers whose ``forward`` is swapped until :meth:`remove` restores it."""

    def __init__(self):
        self._patches: dict[torch.nn.Module, contextlib.ExitStack] = {}

    def _swap(self, layer: torch.nn.Module, forward: Callable) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(patch_attr(layer, "forward", forward))
        self._patches[layer] = stack

    def remove(self, layer: torch.nn.Module) -> bool:
        """Restore ``layer``'s forward; whether it was swapped."""
        stack = self._patches.pop(layer, None)
        if stack is not None:
            stack.close()
        return stack is not None

    def remove_all(self) -> None:
        for layer in list(self._patches):
            self.remove(layer)


class SkippedCalibration(SwappedForwards):
    """Layers that compute only their first batch in the pipeline's calibration pass.

    The first call runs the real forward (its output shows the structure to
    return); later calls return their input hidden state in the hidden state's
    place. Only for layers whose calibration output nobody reads.
    """

    def install(self, layer: torch.nn.Module) -> None:
        self._swap(layer, functools.partial(_first_batch_only, layer.forward, []))


def _first_batch_only(forward: Callable, first_output: list, *args, **kwargs):
    if not first_output:
        output = forward(*args, **kwargs)
        first_output.append(output)
        return output
    hidden, _, _ = split_hidden(args, kwargs)
    template = first_output[0]
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, tuple):
        return (hidden, *template[1:])
    return forward(*args, **kwargs)  # an output structure we cannot fill in


class PropagatedOutputs(SwappedForwards):
    """Layers whose next forwards hand back outputs computed already (the
    pipeline's propagation pass), one per expected call, each only when the
    call's hidden state is the expected one; after the last, or at the first
    call out of step, the layer computes for real again."""

    def install(self, layer: torch.nn.Module, hidden_states: list[torch.Tensor], outputs: list[Any]) -> None:
        if outputs:
            expected = list(zip(hidden_states, outputs))
            self._swap(layer, functools.partial(self._forward, layer, layer.forward, expected))

    def _forward(self, layer, forward, expected: list, *args, **kwargs):
        try:
            hidden = split_hidden(args, kwargs)[0]
        except ValueError:
            hidden = None
        if expected and isinstance(hidden, torch.Tensor):
            want, output = expected[0]
            if want.shape == hidden.shape and torch.equal(want.to(hidden.device), hidden):
                expected.pop(0)
                if not expected:
                    self.remove(layer)
                return send_tensors(output, hidden.device)
        self.remove(layer)
        return forward(*args, **kwargs)
