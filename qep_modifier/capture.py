"""Stream capture: record a layer's calls, then run it again with QEP's hooks only.

llm-compressor's sequential pipeline feeds each decoder layer (sequential
target) the *quantized* stream ``X~``: the outputs of the layers before it,
already quantized. QEP needs more than that one pass gives, so it works the
way the toolkit's own AWQ does: a forward pre-hook records each calibration
batch's call of the layer (its arguments, offloaded like the pipeline's
activations, :class:`RecordedCalls`), and at the end of the subgraph the
modifier runs the layer itself, as often as the method needs
(:class:`LayerPass`): on the full-precision stream, and, group by group, on the
quantized stream up to where a group's inputs are seen. Every such forward runs
with every other hook silenced (``HooksMixin.disable_hooks(keep=...)``), so no
other modifier of the recipe sees a stream twice, and temporary swaps of
``forward`` go through ``compressed_tensors.utils.patch_attr``.

When nothing but QEP reads the pipeline's calibration pass (the pipeline
throws its output away and recomputes it after quantization),
:class:`~qep_modifier.layer_forwards.SkippedCalibration` lets a layer compute
only its first calibration batch there; later batches return their input in
the first output's place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from compressed_tensors.offload.utils import send_tensors
from compressed_tensors.utils import patch_attr
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.pipelines.cache import IntermediatesCache

from qep_modifier.layer_forwards import first_tensor, replace_hidden, split_hidden
from qep_modifier.plan import CallRef, Group, LayerPlan, TraceCall
from qep_modifier.propagation import LastLinear, last_linear, resumed_outputs, same_output

__all__ = [
    "LayerPass",
    "LayerStreams",
    "RecordedCalls",
    "ReplayOutputs",
    "LayerProbe",
    "probe_layer",
]


class RecordedCalls:
    """Each calibration batch's call of each sequential target, in batch order.

    :meth:`record` is the body of a forward pre-hook (``with_kwargs=True``) on
    each layer; calls are offloaded to ``offload_device`` (``None``: kept where
    they are) in an ``IntermediatesCache``, which stores a tensor shared by
    several calls (masks, position embeddings) once.
    """

    def __init__(self, offload_device: torch.device | str | None):
        self.offload_device = offload_device
        self._calls: dict[torch.nn.Module, IntermediatesCache] = {}

    def record(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if layer not in self._calls:
            self._calls[layer] = IntermediatesCache(None, self.offload_device)
        self._calls[layer].append({"args": tuple(args), "kwargs": dict(kwargs)})

    def __len__(self) -> int:
        return len(self._calls)

    def num_batches(self, layer: torch.nn.Module) -> int:
        return len(self._calls.get(layer, ()))

    def fetch(self, layer: torch.nn.Module, batch: int) -> tuple[tuple, dict]:
        """Batch ``batch``'s call of ``layer``, onloaded where it was made."""
        call = self._calls[layer].fetch(batch)
        return call["args"], call["kwargs"]

    def hidden(self, layer: torch.nn.Module, batch: int) -> torch.Tensor:
        """Batch ``batch``'s hidden state in its call of ``layer``."""
        return split_hidden(*self.fetch(layer, batch))[0]

    def drop(self, layer: torch.nn.Module) -> None:
        self._calls.pop(layer, None)

    def clear(self) -> None:
        self._calls.clear()


class _Stop(Exception):
    """Raised from a pre-hook: the pass has what it needs from this forward."""


class ReplayOutputs:
    """Submodule outputs kept from one quantized-stream replay for the next.

    A replay for a later group may resume where the previous one stopped:
    every submodule of the layer that finished before that stop, and that ran
    only Linears already quantized (``final``), would compute the same output
    again. Kept per batch: the outermost such modules that contain a target
    Linear and return a single tensor, or a tuple led by one when the layer
    reads only that (``first_only``: an attention block, which under the
    toolkit's eager attention returns its probabilities beside its output,
    heads x tokens / width times its size, is kept as ``(output, None)``). So
    q/k/v are kept while o's group is calibrated, the attention block while
    the MLP's are and after the last replay for the propagation pass
    (:mod:`qep_modifier.propagation`). A kept output written in place after it
    was kept is dropped (it is recomputed instead).
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        targets: Collection[torch.nn.Module],
        offload_device: torch.device | str | None,
    ):
        targets = set(targets)
        names = {module: name for name, module in layer.named_modules()}
        self.candidates = [
            module
            for module in layer.modules()
            if module is not layer and any(m in targets for m in module.modules())
        ]
        candidate_names = {names[module] for module in self.candidates}
        self._ancestors = {
            module: {
                prefix
                for prefix in _prefixes(names[module])
                if prefix in candidate_names
            }
            for module in self.candidates
        }
        self._names = names
        self.offload_device = offload_device
        # candidates whose tuple output is kept as its first element alone
        # (:func:`probe_layer`); None until probed
        self.first_only: set[torch.nn.Module] | None = None
        # batch -> module -> [(output, versions)] per call, in call order
        self.kept: dict[int, dict[torch.nn.Module, list[tuple[Any, list[int]]]]] = {}

    def keepable(self, module: torch.nn.Module, output: Any) -> Any | None:
        """What is kept of ``module``'s output: a single tensor as it is, a tuple
        led by a tensor as ``(tensor, None, ...)`` for a ``first_only`` module,
        else nothing (``None``)."""
        if isinstance(output, torch.Tensor):
            return output
        if self.first_only and module in self.first_only and _led_by_tensor(output):
            return _first_only(output)
        return None

    def outermost(self, outputs: Mapping[torch.nn.Module, list]) -> dict:
        """The entries of ``outputs`` no ancestor of which is there too."""
        present = {self._names[module] for module in outputs}
        return {
            module: entries
            for module, entries in outputs.items()
            if not self._ancestors[module] & present
        }


class LayerPass:
    """Run a layer on recorded batches with QEP's own hooks only.

    :param owner: the modifier whose ``register_hook`` registers the pass's hooks
    :param layer: the sequential target to run
    :param linears: the layer's target Linears
    :param capture: Linears whose inputs are captured, call by call (private
        copies on ``offload_device``; one copy for calls fed the same tensor)
    :param stop: end each forward at this call's pre-hook (after capturing it)
    :param offload_device: where captured inputs go (``None``: stay put)
    :param weights: Linears that compute with these weights instead of their
        own (the full-precision stream through already quantized groups)
    :param replay: kept submodule outputs to resume from (quantized stream)
    :param final: the Linears already quantized (with ``replay``)
    :param keep_outputs: record this pass's finished submodules into ``replay``
        for the next one
    """

    def __init__(
        self,
        owner: HooksMixin,
        layer: torch.nn.Module,
        linears: Collection[torch.nn.Module],
        *,
        capture: Collection[torch.nn.Module] = (),
        stop: CallRef | None = None,
        offload_device: torch.device | str | None = None,
        weights: Mapping[torch.nn.Module, torch.Tensor] | None = None,
        replay: ReplayOutputs | None = None,
        final: Collection[torch.nn.Module] = (),
        keep_outputs: bool = False,
    ):
        self.owner, self.layer = owner, layer
        self.linears = list(linears)
        self.capture = set(capture)
        self.stop = stop
        self.offload_device = offload_device
        self.weights = dict(weights or {})
        self.replay = replay
        self.final = set(final)
        self.keep_outputs = keep_outputs and replay is not None
        self._handles: set = set()
        # per forward
        self.batch = -1
        self.trace: list[TraceCall] = []
        self._captured: dict[torch.nn.Module, list[torch.Tensor]] = {}
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._call_counts: dict[torch.nn.Module, int] = {}
        self._unfinished_linears = 0
        self._open: list[tuple[torch.nn.Module, int]] = []
        self._finished: dict[torch.nn.Module, list[tuple[Any, list[int]]]] = {}

    # ------------------------------------------------------------- context
    def __enter__(self) -> "LayerPass":
        if self.keep_outputs:
            for module in self.replay.candidates:
                # before the Linears' own pre-hooks: a Linear that is not final
                # counts against itself
                self._hook(module, self._module_pre_hook, "forward_pre")
                self._hook(module, self._module_hook, "forward")
        for linear in self.linears:
            self._hook(linear, self._linear_pre_hook, "forward_pre")
        return self

    def __exit__(self, *exc) -> None:
        self.owner.remove_hooks(set(self._handles))
        self._handles = set()

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """This pass's forward swaps, and its hooks alone enabled."""
        with contextlib.ExitStack() as stack:
            for module, weight in self.weights.items():
                stack.enter_context(
                    patch_attr(
                        module, "forward", functools.partial(linear_with, weight, module)
                    )
                )
            kept = self.replay.kept.get(self.batch, {}) if self.replay is not None else {}
            for module in kept:
                stack.enter_context(
                    patch_attr(
                        module,
                        "forward",
                        functools.partial(self._kept_or_computed, module, module.forward),
                    )
                )
            stack.enter_context(HooksMixin.disable_hooks(keep=set(self._handles)))
            yield

    def _hook(self, module, function, kind) -> None:
        self._handles.add(self.owner.register_hook(module, function, kind))

    # ------------------------------------------------------------------ run
    def run(
        self, batch: int, args: tuple, kwargs: dict, hidden: torch.Tensor | None = None
    ) -> tuple[dict[torch.nn.Module, list[torch.Tensor]], Any]:
        """One forward of batch ``batch``'s call, its hidden state replaced by
        ``hidden`` when given. Returns the captured inputs per Linear and the
        layer's output (``None`` when the pass stopped early)."""
        self.batch = batch
        self.trace, self._captured, self._copies = [], {}, {}
        self._call_counts, self._unfinished_linears = {}, 0
        self._open, self._finished = [], {}
        if hidden is not None:
            args, kwargs = replace_hidden(args, kwargs, hidden)
        output = None
        try:
            with self._running():
                output = self.layer(*args, **kwargs)
        except _Stop:
            pass
        finally:
            if self.keep_outputs:
                self._keep_finished()
            elif self.replay is not None:
                self.replay.kept.pop(batch, None)
            captured = self._captured
            self._copies = {}
        return captured, output

    # ---------------------------------------------------------------- hooks
    def _linear_pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        number = self._call_counts.get(module, 0)
        self._call_counts[module] = number + 1
        inp = args[0]
        if module in self.capture:
            # keep the input alive for the forward: its id names it in the trace
            key = (id(inp), inp._version)
            self.trace.append(TraceCall(module, key))
            if key[0] not in self._copies:
                self._copies[key[0]] = (inp, _private_copy(inp, self.offload_device))
            self._captured.setdefault(module, []).append(self._copies[key[0]][1])
        if module not in self.final:
            self._unfinished_linears += 1
        if self.stop is not None and (module, number) == self.stop:
            raise _Stop()

    def _module_pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        self._open.append((module, self._unfinished_linears))

    def _module_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        opened, unfinished = self._open.pop()
        kept = self.replay.keepable(module, output)
        if opened is module and unfinished == self._unfinished_linears and kept is not None:
            kept = send_tensors(kept, self.offload_device) if self.offload_device else kept
            entry = (kept, [tensor._version for tensor in _tensors(kept)])
            self._finished.setdefault(module, []).append(entry)

    def _kept_or_computed(self, module: torch.nn.Module, forward: Callable, *args, **kwargs):
        entries = self.replay.kept[self.batch].get(module)
        if entries:
            kept, versions = entries.pop(0)
            if [t._version for t in _tensors(kept)] == versions:
                device = _device_of(module, args, kwargs)
                return send_tensors(kept, device) if device is not None else kept
        return forward(*args, **kwargs)

    def _keep_finished(self) -> None:
        finished = {
            module: [
                entry
                for entry in entries
                if [t._version for t in _tensors(entry[0])] == entry[1]
            ]
            for module, entries in self._finished.items()
        }
        # a module with a dropped call is recomputed whole
        finished = {
            module: entries
            for module, entries in finished.items()
            if len(entries) == len(self._finished[module])
        }
        self.replay.kept[self.batch] = self.replay.outermost(finished)


Inputs = dict[torch.nn.Module, list[torch.Tensor]]
#: ``(batch, args, kwargs, hidden)``: a recorded call and the hidden state to
#: run it on instead of its own (``None``: its own)
Batch = tuple[int, tuple, dict, "torch.Tensor | None"]


class LayerStreams:
    """Both streams through one decoder layer, group by group of its plan.

    :meth:`inputs` yields, batch by batch, a group's quantized-stream inputs
    (a replay up to the group, resuming from the previous one with
    ``resume``) and its full-precision inputs. The full-precision pass (the
    layer's original weights on the full-precision stream) runs alongside the
    first group's replay: it hands that group its inputs at once, keeps those
    of later paired groups (``cache_full_precision``; otherwise each later
    group replays the full-precision stream through the earlier groups'
    original weights) and the next layer's full-precision input
    (``stream_needed``), which :meth:`finish` returns.

    :param owner: the modifier whose ``register_hook`` the passes use
    :param layer: the decoder layer; ``linears``: its target Linears
    :param calls: yields the layer's recorded calls ``(batch, args, kwargs)``
    :param quantized_hidden: each batch's quantized-stream input (``None``:
        the recorded one)
    :param full_precision_hidden: each batch's full-precision input (``None``:
        the recorded one: nothing before the layer is quantized)
    :param plan: the layer's plan; ``final``: Linears of the layer already
        quantized before it
    :param last: the last group's Linear, whose inputs the last replay keeps
        (with the attention block's output) for :meth:`outputs` (``None``: it keeps
        nothing; needs ``resume``)
    """

    def __init__(
        self,
        owner: HooksMixin,
        layer: torch.nn.Module,
        linears: list[torch.nn.Module],
        calls: Callable[[], Iterator[tuple[int, tuple, dict]]],
        *,
        quantized_hidden: list[torch.Tensor] | None,
        full_precision_hidden: list[torch.Tensor] | None,
        plan: LayerPlan,
        final: Collection[torch.nn.Module] = (),
        stream_needed: bool,
        cache_full_precision: bool,
        resume: bool,
        offload_device: torch.device | str | None,
        last: LastLinear | None = None,
    ):
        self.owner, self.layer, self.linears, self.plan = owner, layer, linears, plan
        self._calls = calls
        self._quantized_hidden = quantized_hidden
        self._full_precision_hidden = full_precision_hidden
        self.final = set(final)
        self.stream_needed = stream_needed
        self.cache_full_precision = cache_full_precision
        self.offload_device = offload_device
        self.replay = ReplayOutputs(layer, linears, offload_device) if resume else None
        self.last = last if resume else None
        # group number -> (its one Linear, how its module returns its output)
        # for the next replay to resume from (:meth:`_probe`)
        self._resumable: dict[int, tuple[LastLinear, int]] = {}
        self._original_weights: dict[torch.nn.Module, torch.Tensor] = {}
        self._kept_inputs: list[Inputs] = []  # later paired groups' X, per batch
        self._next_stream: list[torch.Tensor] = []
        self._passed = False  # the full-precision pass has run

    # ------------------------------------------------------------------ api
    def inputs(self, group: Group) -> Iterator[tuple[Inputs, Inputs | None]]:
        """Each batch's ``(X~, X)`` of ``group``'s members, call by call (``X`` is
        ``None`` for a group that needs no full-precision stream)."""
        if self.replay is not None and self.replay.first_only is None:
            self._probe()
        is_last = group is self.plan.groups[-1]
        keeps_last = is_last and self.last is not None
        number = self.plan.groups.index(group)
        # the previous group's one Linear, whose kept input stands in for its
        # module's output; this group's, whose input is kept for the next
        resumes_from = self._resumable.pop(number - 1, None)
        kept_for_next = self._resumable.get(number)
        with contextlib.ExitStack() as stack:
            up_to_group = functools.partial(
                LayerPass, self.owner, self.layer, self.linears,
                capture=group.modules, stop=group.stop,
            )
            quantized = stack.enter_context(
                up_to_group(replay=self.replay, final=self.final, keep_outputs=not is_last or keeps_last)
            )
            full_pass = None if self._passed else self._full_precision_pass(stack, group)
            full_replay = None
            if group.paired and not self.cache_full_precision and full_pass is None:
                full_replay = stack.enter_context(up_to_group(weights=self._original_weights))
            full_precision_calls = (
                self._batches(self._full_precision_hidden)
                if full_pass is not None or full_replay is not None
                else None
            )
            for batch, args, kwargs, hidden in self._batches(self._quantized_hidden):
                x = None
                if full_pass is not None:
                    x = self._run_full_precision_pass(full_pass, next(full_precision_calls))
                elif full_replay is not None:
                    x = full_replay.run(*next(full_precision_calls))[0]
                elif group.paired:
                    x = self._kept_inputs[batch]
                if resumes_from is not None:
                    self._resume_from(resumes_from, batch)
                captured, _ = quantized.run(batch, args, kwargs, hidden)
                if kept_for_next is not None:
                    last, _ = kept_for_next
                    if not last.keep(batch, captured.get(last.linear, [])):
                        last.inputs.clear()  # called twice: the next replay computes it
                        self._resumable.pop(number, None)
                        kept_for_next = None
                if keeps_last:
                    keeps_last = quantized.keep_outputs = self._keep_last(batch, captured)
                yield group.inputs(captured), group.inputs(x) if group.paired else None
                if self.cache_full_precision and group.paired:
                    for module in group.modules:  # read once: free it
                        self._kept_inputs[batch].pop(module, None)
            if resumes_from is not None:
                resumes_from[0].inputs.clear()
            self._passed = True

    def quantizing(self, group: Group) -> None:
        """``group``'s weights are about to change: later replays treat it as
        final; later full-precision replays keep computing with its original
        weights."""
        later = self.plan.groups[self.plan.groups.index(group) + 1 :]
        if not self.cache_full_precision and any(g.paired for g in later):
            for module in group.modules:
                self._original_weights[module] = module.weight.detach().to(
                    self.offload_device or module.weight.device, copy=True
                )
        self.final.update(group.modules)

    def finish(self) -> list[torch.Tensor] | None:
        """The next layer's full-precision input (``None`` when not needed)."""
        if not self._passed and self.stream_needed:
            with contextlib.ExitStack() as stack:
                full_pass = self._full_precision_pass(stack)
                for call in self._batches(self._full_precision_hidden):
                    self._run_full_precision_pass(full_pass, call)
        self._original_weights, self._kept_inputs = {}, []
        return self._next_stream if self.stream_needed else None

    def outputs(self) -> list[Any] | None:
        """Each batch's output of the (now quantized) layer, resumed from the
        last replay (:mod:`qep_modifier.propagation`), or ``None`` where it
        cannot be (no ``last``, or batch 0 shows it is not the whole forward)."""
        if self.last is None:
            if self.replay is not None:
                self.replay.kept.clear()
            return None
        try:
            with (
                LayerPass(self.owner, self.layer, self.linears) as whole,
                LayerPass(self.owner, self.layer, self.linears, replay=self.replay) as resumed,
            ):
                return resumed_outputs(
                    whole, resumed, self._batches(self._quantized_hidden), self.replay.kept, self.last,
                    self.offload_device,
                )
        finally:
            self.replay.kept.clear()
            self.last.inputs.clear()

    def propagate(self) -> list[torch.Tensor]:
        """The (now quantized) layer's output for each batch: what the next
        layer of the same subgraph gets as its quantized-stream input."""
        outputs = []
        with LayerPass(self.owner, self.layer, self.linears) as plain:
            for call in self._batches(self._quantized_hidden):
                hidden = first_tensor(plain.run(*call)[1])
                outputs.append(hidden.to(self.offload_device or hidden.device))
        return outputs

    def quantized_calls(self) -> Callable[[], Iterator[Batch]]:
        """Each batch's recorded call with its quantized-stream input:
        ``(batch, args, kwargs, hidden)``, ``hidden`` ``None`` for the recorded one."""
        return functools.partial(self._batches, self._quantized_hidden)

    # -------------------------------------------------------------- helpers
    def _probe(self) -> None:
        """Batch 0's call through the layer, twice (:func:`probe_layer`): which
        modules the replays may keep as their tuple output's first element, and
        which earlier groups' one Linear the next replay may resume from (its
        kept input standing for the module that returns its output: o_proj's
        for the attention block)."""
        self.replay.first_only = set()
        call = next(self._batches(self._quantized_hidden), None)
        lasts = {number: last_linear(self.layer, group.modules) for number, group in enumerate(self.plan.groups[:-1])}
        lasts = {number: last for number, last in lasts.items() if last is not None}
        if call is None:
            return
        with LayerPass(self.owner, self.layer, self.linears) as plain:
            probe = probe_layer(lambda: plain.run(*call)[1], self.replay.candidates, lasts.values())
        self.replay.first_only = set(probe.first_only)
        self._resumable = {
            number: (last, probe.returning[last]) for number, last in lasts.items() if last in probe.returning
        }

    def _resume_from(self, resumable: tuple[LastLinear, int], batch: int) -> None:
        """Hand the replay on ``batch`` the output of the module that returns
        ``last.linear``'s (quantized since it was kept): the Linear on its kept
        input, first in a tuple where the module returns one."""
        last, length = resumable
        output = last.output(batch, last.linear.weight.device)
        if output is None:  # none kept, or written since: computed
            return
        value = output if length == 0 else (output, *(None,) * (length - 1))
        kept = self.replay.kept.setdefault(batch, {})
        for module in [m for m in kept if m in last.inside]:
            del kept[module]
        kept[last.returned_by] = [(value, [output._version])]

    def _keep_last(self, batch: int, captured: Inputs) -> bool:
        """Keep the last replay's input of ``last`` on ``batch``, and its kept
        outputs but those inside the module that returns ``last``'s output (which
        :meth:`outputs` computes from that input); whether it could (else
        nothing is kept, and the pipeline's pass runs whole)."""
        kept = self.replay.kept.get(batch, {})
        for module in [m for m in kept if m in self.last.inside]:
            del kept[module]
        if self.last.keep(batch, captured.get(self.last.linear, [])):
            return True
        self.replay.kept.clear()
        self.last.inputs.clear()
        self.last = None
        return False

    def _batches(self, hidden_states: list[torch.Tensor] | None) -> Iterator[Batch]:
        for batch, args, kwargs in self._calls():
            hidden = None
            if hidden_states is not None:
                hidden = hidden_states[batch].to(split_hidden(args, kwargs)[0].device)
            yield batch, args, kwargs, hidden

    def _full_precision_pass(
        self, stack: contextlib.ExitStack, first: Group | None = None
    ) -> LayerPass | None:
        """The pass over the full-precision stream with the original weights
        (beside the ``first`` group's replay), or ``None`` when nothing needs
        it. Without a reader of its output it stops once the inputs it keeps are
        seen."""
        if self.cache_full_precision:
            capture = self.plan.paired_modules
        elif self.stream_needed and first is not None and first.paired:
            capture = first.modules  # read at once, not kept
        else:
            capture = ()
        if not capture and not self.stream_needed:
            return None
        return stack.enter_context(
            LayerPass(
                self.owner,
                self.layer,
                self.linears,
                capture=capture,
                stop=None if self.stream_needed else self.plan.full_precision_stop,
                offload_device=self.offload_device,
            )
        )

    def _run_full_precision_pass(self, full_pass: LayerPass, call: Batch) -> Inputs:
        batch = call[0]
        captured, output = full_pass.run(*call)
        if self.cache_full_precision:
            self._kept_inputs.append(captured)
        if self.stream_needed:
            hidden = first_tensor(output)
            self._next_stream.append(hidden.to(self.offload_device or hidden.device))
        if self.cache_full_precision and self._full_precision_hidden is not None:
            self._full_precision_hidden[batch] = None  # read for the last time
        return captured


@dataclasses.dataclass(frozen=True)
class LayerProbe:
    """What one call of a layer, run twice, shows about resuming it.

    :param first_only: the candidates that return a tuple led by a tensor
        (with something beside it) of which the layer reads only that tensor
    :param returning: the :class:`~qep_modifier.propagation.LastLinear` s whose
        module returns the Linear's output object as it is, each called once:
        ``last -> 0`` where it returns it alone, ``-> n`` where it is the first
        of a ``first_only`` n-tuple
    """

    first_only: frozenset
    returning: dict


def probe_layer(
    layer_output: Callable[[], Any],
    candidates: Collection[torch.nn.Module],
    lasts: Collection[LastLinear] = (),
) -> LayerProbe:
    """:class:`LayerProbe` of ``layer_output()`` (runs the layer on one call and
    returns its output). It runs once, and once more with the tuple-returning
    candidates returning ``(tensor, None, ...)``: they are all ``first_only``
    when the two outputs are bit-equal, none otherwise (a layer that reads an
    attention block's probabilities computes something else, or fails on the
    ``None``)."""
    tuples: set[torch.nn.Module] = set()
    outputs: dict[torch.nn.Module, list] = {}

    def record(module, args, output):
        if module in candidates and _led_by_tensor(output) and any(item is not None for item in output[1:]):
            tuples.add(module)
        outputs.setdefault(module, []).append(output)

    def strip(module, args, output):
        return _first_only(output) if _led_by_tensor(output) else output

    watched = {*candidates, *(last.linear for last in lasts), *(last.returned_by for last in lasts)}
    whole = _with_forward_hook(watched, record, layer_output)
    first_only: set[torch.nn.Module] = set()
    if tuples:
        try:
            if same_output(whole, _with_forward_hook(tuples, strip, layer_output)):
                first_only = tuples
        except Exception:  # it reads what was dropped
            pass

    def returned_as(last: LastLinear) -> int | None:
        linear, returned = outputs.get(last.linear, []), outputs.get(last.returned_by, [])
        if len(linear) != 1 or len(returned) != 1:
            return None
        if returned[0] is linear[0]:
            return 0
        if last.returned_by in first_only and returned[0][0] is linear[0]:
            return len(returned[0])
        return None

    returning = {last: returned_as(last) for last in lasts}
    return LayerProbe(
        frozenset(first_only), {last: length for last, length in returning.items() if length is not None}
    )


def _with_forward_hook(modules: Collection[torch.nn.Module], hook: Callable, run: Callable[[], Any]) -> Any:
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


def _led_by_tensor(output: Any) -> bool:
    return isinstance(output, tuple) and len(output) > 1 and isinstance(output[0], torch.Tensor)


def _first_only(output: tuple) -> tuple:
    return (output[0], *(None,) * (len(output) - 1))


def _private_copy(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``, never sharing its storage."""
    moved = tensor.detach().to(device) if device is not None else tensor.detach()
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _device_of(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.device | None:
    for tensor in _tensors((args, kwargs)):
        return tensor.device
    for parameter in module.parameters():
        return parameter.device
    return None


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:index]) for index in range(1, len(parts))]


def linear_with(weight: torch.Tensor, module: torch.nn.Module, inp: torch.Tensor):
    """``module``'s forward with ``weight`` in place of its own."""
    bias = module.bias
    return torch.nn.functional.linear(
        inp,
        weight.to(device=inp.device, dtype=inp.dtype),
        None if bias is None else bias.to(device=inp.device, dtype=inp.dtype),
    )

