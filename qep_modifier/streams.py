"""Dual-stream input capture inside llm-compressor's sequential pipeline.

The sequential pipeline calibrates one sequential target (a decoder layer by
default) at a time. Its calibration pass feeds the layer X~-stream inputs: the
outputs of the previous, already quantized layers. While the pipeline's hooks
are on, the layer itself is still full precision. That makes the layer's
forward hook the place to get the second stream. After the quantized-stream
call returns, the hook calls the layer again on the full-precision hidden state
of the same calibration batch (the output of the full-precision run of the
previous layer, kept per batch on an offload device). The Linear hooks see X~
during the first call and X during the second, so the two are paired token by
token without ever holding more than one layer's inputs for one batch. The
full-precision run's output is kept as the next layer's full-precision input.

Within-block order (``true_sequential``): the Linears of a layer fall into
groups of modules that consume the same input tensor, in execution order
(attention inputs, attention output, MLP inputs, MLP output for a Llama
layer). The first group's statistics come from the calibration pass. For each
later group the layer is replayed per batch on the quantized stream, with the
earlier groups already quantized. Its full-precision inputs were kept from the
full-precision re-run (``cache_full_precision``), or the full-precision stream
is replayed too, with the earlier groups' outputs recomputed from their
original weights (their ``forward`` is swapped on the instance for the replay;
no parameter is written). A group none of whose modules is corrected has no
full-precision side. The Linear hooks are pre-hooks, so each replay stops as
soon as the group's last Linear has its input, before it computes anything.

What the first pass does not need is not computed: once a layer's groups are
known (after its first batch), the later groups' Linears (:attr:`deferred`)
hand nothing to the accumulators outside their replays, and, when nothing else
reads the calibration pass (``skip_deferred_compute``), they return zeros
there instead of computing: the pipeline throws that pass's output away and
feeds the next layer the propagation pass's (``propagate_error=True``, checked
at the next layer).

Nothing here patches llm-compressor: besides the per-instance ``forward`` swaps
above (always undone), the class only reacts to hook calls that the modifier
registers through ``HooksMixin``, which the pipeline silences during its
propagation pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from compressed_tensors.offload.utils import send_tensors

__all__ = ["DualStreamCapture", "QUANTIZED", "FULL_PRECISION"]

QUANTIZED = "quantized"
FULL_PRECISION = "full_precision"


class _StopReplay(Exception):
    """Raised from a Linear hook to end a replay once its group has been seen."""


@dataclass
class _LayerCall:
    """One batch's call of a sequential target, kept for within-block replays."""

    args: tuple
    kwargs: dict
    quantized_hidden: torch.Tensor
    # None when the later groups' full-precision inputs are cached instead
    full_precision_hidden: torch.Tensor | None
    # cached full-precision inputs of later groups' Linears, in call order
    full_precision_inputs: dict[torch.nn.Module, list[torch.Tensor]] = field(
        default_factory=dict
    )


@dataclass
class _LayerRecord:
    """What one sequential target's calibration pass has shown so far."""

    execution_order: list[tuple[torch.nn.Module, int]] = field(default_factory=list)
    order_complete: bool = False
    calls: dict[int, _LayerCall] = field(default_factory=dict)


class DualStreamCapture:
    """Routes Linear inputs to the quantized or full-precision stream.

    :param layers: the sequential targets in execution order
    :param linear_layer: for each target Linear inside a layer, its layer
    :param on_quantized_input: ``(linear, X~)``: accumulate the Hessian
    :param on_input_pair: ``(linear, X, X~)``: accumulate the cross term
    :param offload_device: where full-precision hidden states wait between layers
    :param full_precision_stream: run the full-precision stream at all (off when
        no module is corrected: FOEM alone needs only the quantized stream)
    :param keep_layer_calls: keep each batch's layer call for within-block replays
    :param on_unpaired: ``(linear,)``: the full-precision stream fed ``linear``
        other tokens than the quantized one (a mixture-of-experts router sent
        them elsewhere); without it that raises
    :param on_layer_order: ``(layer,)``: the layer's first call has ended, so
        :meth:`groups` knows its within-block groups
    :param cache_full_precision: keep the full-precision re-run's inputs of the
        Linears in :attr:`cached_linears` (later groups' corrected modules) for
        the replays, instead of replaying the full-precision stream: less
        compute, one more activation cache per such group while a layer is
        calibrated (and the layer's full-precision input is not kept)
    :param skip_deferred_compute: in the calibration pass (whose output the
        pipeline throws away, see :meth:`_check_skipped_output`), let the Linears in
        :attr:`deferred` return zeros instead of computing; only safe when no
        other hook reads what comes after them
    """

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        linear_layer: dict[torch.nn.Module, torch.nn.Module],
        on_quantized_input: Callable[[torch.nn.Module, torch.Tensor], None],
        on_input_pair: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None],
        offload_device: torch.device | str | None = "cpu",
        full_precision_stream: bool = True,
        keep_layer_calls: bool = False,
        on_unpaired: Callable[[torch.nn.Module], None] | None = None,
        on_layer_order: Callable[[torch.nn.Module], None] | None = None,
        cache_full_precision: bool = False,
        skip_deferred_compute: bool = False,
    ):
        self.layer_index = {layer: index for index, layer in enumerate(layers)}
        self.linear_layer = linear_layer
        self.on_quantized_input = on_quantized_input
        self.on_input_pair = on_input_pair
        self.offload_device = offload_device
        self.full_precision_stream = full_precision_stream
        self.keep_layer_calls = keep_layer_calls
        self.on_unpaired = on_unpaired
        self.on_layer_order = on_layer_order
        self.cache_full_precision = cache_full_precision
        self.skip_deferred_compute = skip_deferred_compute
        # filled by the owner once a layer's groups are known (on_layer_order):
        # Linears whose statistics come from the replays only, so the first pass
        # (calibration call and full-precision re-run) hands them to nobody ...
        self.deferred: set[torch.nn.Module] = set()
        # ... and those among them whose full-precision inputs the re-run keeps
        self.cached_linears: set[torch.nn.Module] = set()
        self._skipping: dict[torch.nn.Module, object] = {}
        self._skipped_output: tuple[torch.nn.Module, int, torch.Tensor] | None = None
        self._skipped_in_call = False

        self.stream = QUANTIZED
        self.full_precision_inputs: dict[int, torch.Tensor] = {}
        self.records: dict[torch.nn.Module, _LayerRecord] = {}
        # quantized-stream inputs waiting for their full-precision twin, in call
        # order per Linear (a module called twice per forward pairs call by call)
        self._pending: dict[torch.nn.Module, list[torch.Tensor]] = {}
        self._in_layer_rerun = False
        self._accept: set[torch.nn.Module] | None = None
        self._stop_after: torch.nn.Module | None = None
        self._replay_full_precision = True
        self._stop_calls, self._stop_seen = 1, 0
        # the full-precision re-run's cached Linear inputs, while it runs
        self._caching: dict[torch.nn.Module, list[torch.Tensor]] | None = None
        self._last_offloaded: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ hooks
    def linear_input(self, linear: torch.nn.Module, inp: torch.Tensor) -> None:
        """Forward pre-hook body for a target Linear: ``inp`` is its input."""
        if self._accept is not None and linear not in self._accept:
            return self._maybe_stop(linear)
        if self._accept is None and linear in self.deferred:
            if self.stream == FULL_PRECISION and self._caching is not None and (
                linear in self.cached_linears
            ):
                self._caching.setdefault(linear, []).append(self._offloaded(inp))
            return
        layer = self.linear_layer.get(linear)
        if self.stream == QUANTIZED:
            if layer is not None and not self._in_layer_rerun and self._accept is None:
                record = self.records.setdefault(layer, _LayerRecord())
                if not record.order_complete:
                    # keep the input alive until the call ends: an id alone could be
                    # reused by a later tensor at the same address
                    record.execution_order.append((linear, inp))
            self.on_quantized_input(linear, inp)
            if layer is not None and self.full_precision_stream and (
                self._accept is None or self._replay_full_precision
            ):
                self._pending.setdefault(linear, []).append(inp)
        else:
            self._pair(linear, inp)
        self._maybe_stop(linear)

    def _pair(self, linear: torch.nn.Module, full_precision_input: torch.Tensor):
        """Pair a full-precision input with the quantized one waiting for it."""
        waiting = self._pending.get(linear)
        quantized_input = waiting.pop(0) if waiting else None
        if waiting is not None and not waiting:
            del self._pending[linear]
        if quantized_input is None or quantized_input.shape != full_precision_input.shape:
            # the streams took different paths (e.g. MoE routing): no pairs
            self._unpaired(linear)
        else:
            quantized_input = quantized_input.to(full_precision_input.device)
            self.on_input_pair(linear, full_precision_input, quantized_input)

    def _offloaded(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the offload device, one copy for Linears sharing it."""
        if self._last_offloaded is None or self._last_offloaded[0] is not tensor:
            device = self.offload_device or tensor.device
            self._last_offloaded = (tensor, tensor.to(device))
        return self._last_offloaded[1]

    def layer_output(
        self,
        layer: torch.nn.Module,
        args: tuple,
        kwargs: dict,
        output: Any,
        batch_index: int,
    ) -> None:
        """Forward hook body for a sequential target, after its quantized call."""
        if self._in_layer_rerun or self._accept is not None:
            return
        record = self.records.setdefault(layer, _LayerRecord())
        if not record.order_complete:  # all inputs alive here: ids are distinct
            record.execution_order = [
                (linear, id(inp)) for linear, inp in record.execution_order
            ]
            record.order_complete = True
            if self.on_layer_order is not None:
                self.on_layer_order(layer)
            if self.skip_deferred_compute:
                self._skip_deferred(layer)
        self._check_skipped_output(layer, args, kwargs, output, batch_index)
        if not self.full_precision_stream and not self.keep_layer_calls:
            return
        hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
        full_precision_hidden = hidden
        cached: dict[torch.nn.Module, list[torch.Tensor]] = {}
        if self.full_precision_stream:
            full_precision_hidden = self._full_precision_input(
                layer, hidden, batch_index
            )
            self._caching = cached if self.cache_full_precision else None
            try:
                with self._stream(FULL_PRECISION), self._rerun():
                    output = layer(
                        full_precision_hidden.to(hidden.device),
                        *rest_args,
                        **rest_kwargs,
                    )
            finally:
                self._caching, self._last_offloaded = None, None
            self._unpair_leftovers()
            self.full_precision_inputs[batch_index] = _first_tensor(output).to(
                self.offload_device or hidden.device
            )
        if self.keep_layer_calls:
            offload = self.offload_device or hidden.device
            record.calls[batch_index] = _LayerCall(
                args=send_tensors(rest_args, offload),
                kwargs=send_tensors(rest_kwargs, offload),
                quantized_hidden=hidden.to(offload),
                full_precision_hidden=(
                    None
                    if self.cache_full_precision
                    else full_precision_hidden.to(offload)
                ),
                full_precision_inputs=cached,
            )

    # --------------------------------------------------------------- groups
    def groups(self, layer: torch.nn.Module) -> list[list[torch.nn.Module]]:
        """The layer's Linears grouped by shared input, in execution order."""
        record = self.records.get(layer)
        if record is None:
            return []
        groups: list[list[torch.nn.Module]] = []
        last_input = None
        seen: set[torch.nn.Module] = set()
        for linear, input_id in record.execution_order:
            if linear in seen:
                continue
            seen.add(linear)
            if groups and input_id == last_input:
                groups[-1].append(linear)
            else:
                groups.append([linear])
            last_input = input_id
        return groups

    def replay_group(
        self,
        layer: torch.nn.Module,
        group: Sequence[torch.nn.Module],
        original_weights: dict[torch.nn.Module, torch.Tensor],
        full_precision: bool = True,
    ) -> None:
        """Feed ``group`` both streams again, every batch, then stop early.

        The quantized stream runs with the layer as it is now (earlier groups
        quantized); in the full-precision stream those earlier groups compute
        their outputs from ``original_weights``, or, with
        ``cache_full_precision``, the group's inputs cached during the
        calibration pass are paired instead. ``full_precision=False`` skips the
        full-precision stream (no module of the group is corrected).
        """
        record = self.records[layer]
        order = [linear for linear, _ in record.execution_order]
        members = set(group)
        # stop after the group's last call (a shared Linear may run more than once)
        end = max(index for index, linear in enumerate(order) if linear in members)
        last = order[end]
        self._stop_calls = order[: end + 1].count(last)
        self._accept, self._stop_after = members, last
        self._replay_full_precision = full_precision
        try:
            for _, call in sorted(record.calls.items()):
                device = _device_of(layer, call.quantized_hidden)
                args = send_tensors(call.args, device)
                kwargs = send_tensors(call.kwargs, device)
                self._stop_seen = 0
                with self._stream(QUANTIZED), contextlib.suppress(_StopReplay):
                    layer(call.quantized_hidden.to(device), *args, **kwargs)
                if self.full_precision_stream and full_precision:
                    with self._stream(FULL_PRECISION):
                        if self.cache_full_precision:
                            self._pair_cached(call, order[: end + 1], members, device)
                        else:
                            with (
                                _full_precision_outputs(original_weights),
                                contextlib.suppress(_StopReplay),
                            ):
                                self._stop_seen = 0
                                hidden = call.full_precision_hidden.to(device)
                                layer(hidden, *args, **kwargs)
                    self._unpair_leftovers()
                self._pending.clear()
        finally:
            self._accept, self._stop_after = None, None
            self._pending.clear()

    def _pair_cached(
        self,
        call: _LayerCall,
        order: Sequence[torch.nn.Module],
        members: set[torch.nn.Module],
        device: torch.device,
    ) -> None:
        """Pair the group's cached full-precision inputs, in call ``order``."""
        onloaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for linear in order:
            inputs = call.full_precision_inputs.get(linear)
            if linear not in members or not inputs:
                continue
            cached = inputs.pop(0)  # one copy for Linears sharing it
            if id(cached) not in onloaded:
                onloaded[id(cached)] = (cached, cached.to(device))
            self._pair(linear, onloaded[id(cached)][1])

    def end_calibration_pass(self) -> None:
        """The calibration pass is over: deferred Linears compute again."""
        for module, previous in self._skipping.items():
            _restore_forward(module, previous)
        self._skipping = {}

    def end_layer(self, layer: torch.nn.Module) -> None:
        """Drop what was kept for ``layer``'s replays."""
        self.records.pop(layer, None)
        self._pending.clear()
        linears = self.layer_linears(layer)
        self.deferred.difference_update(linears)
        self.cached_linears.difference_update(linears)

    def layer_linears(self, layer: torch.nn.Module) -> list[torch.nn.Module]:
        """The target Linears inside ``layer``."""
        return [linear for linear, owner in self.linear_layer.items() if owner is layer]

    def reset(self) -> None:
        self.end_calibration_pass()
        self.full_precision_inputs.clear()
        self.records.clear()
        self._pending.clear()
        self.deferred.clear()
        self.cached_linears.clear()
        self._skipped_output = None

    # ------------------------------------------------- skipped computation
    def _skip_deferred(self, layer: torch.nn.Module) -> None:
        """From the next calibration call on, ``layer``'s deferred Linears
        return zeros in the calibration pass (the full-precision re-run, run
        inside it, still computes)."""
        for linear in self.layer_linears(layer):
            if linear in self.deferred and linear not in self._skipping:
                self._skipping[linear] = linear.__dict__.get(
                    "forward", _NO_INSTANCE_FORWARD
                )
                linear.forward = functools.partial(self._calibration_forward, linear)

    def _calibration_forward(self, linear: torch.nn.Module, inp: torch.Tensor):
        if self.stream == QUANTIZED and self._accept is None:
            self._skipped_in_call = True
            return inp.new_zeros(*inp.shape[:-1], linear.weight.shape[0])
        previous = self._skipping.get(linear, _NO_INSTANCE_FORWARD)
        if previous is _NO_INSTANCE_FORWARD:
            return type(linear).forward(linear, inp)
        return previous(inp)

    def _check_skipped_output(self, layer, args, kwargs, output, batch_index) -> None:
        """Refuse to run where the calibration pass's output is not thrown away.

        llm-compressor's default (``propagate_error=True``) feeds the next layer
        the propagation pass's output, computed after quantization. With
        ``propagate_error=False`` it feeds the calibration pass's output, in
        which deferred Linears returned zeros (and in which nothing is
        quantized: the quantized stream would be the full-precision one). The
        first skipped call's output is kept to compare.
        """
        if self._skipped_output is not None:
            previous, batch, kept = self._skipped_output
            index = self.layer_index.get(layer)
            if batch == batch_index and index == self.layer_index[previous] + 1:
                hidden, _, _ = _split_hidden(args, kwargs)
                self._skipped_output = None
                if hidden.shape == kept.shape and torch.equal(hidden.to(kept.device), kept):
                    raise RuntimeError(
                        "QEP needs oneshot's propagate_error=True (its default): "
                        "with propagate_error=False each layer is fed the previous "
                        "layer's output before quantization, so there is no "
                        "quantized stream to correct for"
                    )
        skipped, self._skipped_in_call = self._skipped_in_call, False
        if skipped and self._skipped_output is None:
            kept = _first_tensor(output).detach()
            offload = self.offload_device or kept.device
            self._skipped_output = (layer, batch_index, kept.to(offload, copy=True))

    # -------------------------------------------------------------- helpers
    def _full_precision_input(
        self, layer: torch.nn.Module, hidden: torch.Tensor, batch_index: int
    ) -> torch.Tensor:
        if self.layer_index.get(layer, 0) == 0:
            # nothing before the first layer is quantized: both streams agree
            return hidden
        if batch_index not in self.full_precision_inputs:
            raise RuntimeError(
                f"QEP: no full-precision input for calibration batch {batch_index} "
                f"of sequential target #{self.layer_index[layer]}; the sequential "
                "targets must be called in order, each on the previous one's output"
            )
        return self.full_precision_inputs.pop(batch_index)

    def _unpair_leftovers(self) -> None:
        """Linears the quantized stream reached and the full-precision one did not."""
        leftovers, self._pending = list(self._pending), {}
        for linear in leftovers:
            self._unpaired(linear)

    def _unpaired(self, linear: torch.nn.Module) -> None:
        """The streams fed ``linear`` different tokens, or only one reached it."""
        if self.on_unpaired is None:
            raise RuntimeError(
                "QEP: the full-precision and quantized streams fed different tokens "
                "to a Linear (or only one of them reached it); the layer's control "
                "flow depends on its input, which dual-stream capture cannot pair"
            )
        self.on_unpaired(linear)

    def _maybe_stop(self, linear: torch.nn.Module) -> None:
        if self._stop_after is not None and linear is self._stop_after:
            self._stop_seen += 1
            if self._stop_seen >= self._stop_calls:
                raise _StopReplay()

    @contextlib.contextmanager
    def _stream(self, stream: str):
        previous, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = previous

    @contextlib.contextmanager
    def _rerun(self):
        self._in_layer_rerun = True
        try:
            yield
        finally:
            self._in_layer_rerun = False


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Separate a layer call's hidden state from its other arguments."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise ValueError(
        "QEP: a sequential target was called without a positional hidden state or "
        "a `hidden_states` keyword; dual-stream capture cannot find its input"
    )


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(
        output[0], torch.Tensor
    ):
        return output[0]
    raise TypeError(
        f"QEP: a sequential target returned {type(output).__name__}; expected a "
        "tensor or a tuple whose first element is the hidden state"
    )


def _device_of(layer: torch.nn.Module, fallback: torch.Tensor) -> torch.device:
    for parameter in layer.parameters():
        return parameter.device
    return fallback.device


_NO_INSTANCE_FORWARD = object()


def _restore_forward(module: torch.nn.Module, previous: object) -> None:
    if previous is _NO_INSTANCE_FORWARD:
        del module.forward
    else:
        module.forward = previous


@contextlib.contextmanager
def _full_precision_outputs(weights: dict[torch.nn.Module, torch.Tensor]):
    """Make each Linear in ``weights`` compute ``x W^T + b`` with the given weight.

    The module's ``forward`` is replaced on the instance for the duration (so
    the quantized weight's product is never computed and thrown away); forward
    hooks still run. No parameter is written, so offloaded and rank-shared
    weights are never touched.
    """
    replaced = []
    try:
        for module, weight in weights.items():
            replaced.append(
                (module, module.__dict__.get("forward", _NO_INSTANCE_FORWARD))
            )
            module.forward = functools.partial(_linear_with, weight, module)
        yield
    finally:
        for module, previous in reversed(replaced):
            _restore_forward(module, previous)


def _linear_with(weight: torch.Tensor, module: torch.nn.Module, inp: torch.Tensor):
    bias = module.bias
    return torch.nn.functional.linear(
        inp,
        weight.to(device=inp.device, dtype=inp.dtype),
        None if bias is None else bias.to(device=inp.device, dtype=inp.dtype),
    )
