"""One calibration run of QEP: :class:`CalibrationRun` holds its state from
``on_calibration_start`` to ``on_finalize`` and calibrates each subgraph that
llm-compressor's sequential pipeline hands over. Data flows one way:

1. **record** (calibration pass): a pre-hook keeps each batch's call of each
   decoder layer (:class:`~qep_modifier.capture.RecordedCalls`). When nothing
   else reads that pass, the layers compute only its first batch there.
2. **plan** (epoch end): one traced forward gives the layer's within-block
   groups (:func:`~qep_modifier.plan.plan_layer`).
3. **run**: a full-precision pass (original weights, on the full-precision
   stream kept from the previous layer) keeps the corrected Linears' inputs
   ``X`` and the next layer's full-precision input; then, group by group, a
   replay of the quantized stream up to the group (resuming from the previous
   replay) gives ``X~`` (:class:`~qep_modifier.capture.LayerStreams`); the
   statistics (:mod:`qep_modifier.statistics`) are summed over the batches,
   then over the ranks (:mod:`qep_modifier.distributed`).
4. **correct**: ``W* = W + a W C (H~ + l I)^-1`` (:mod:`qep_modifier.correction`,
   ``a`` from :mod:`qep_modifier.strength`).
5. **quantize**: the observer's scales on ``W*``, then the GPTQ sweep with
   ``H~`` (with FOEM's term when ``first_order_strength > 0``,
   :mod:`qep_modifier.gptq_sweep`) or round to nearest; with ``refit_scales``
   the scales are refitted to the sweep's codes
   (:func:`~qep_modifier.gptq_sweep.refit_group_scales`), sweeping again
   between refits (:class:`~qep_modifier.quantize.GroupQuantizer`). Each unit
   of modules gets one owner rank, which quantizes it and publishes the result.
6. **tune** (``block_tuning_epochs``): Adam on the layer's group scales and
   norm weights against the full-precision layer's output, and on latent codes
   started from the sweep's unrounded weights with
   ``block_tuning_code_learning_rate`` (:mod:`qep_modifier.block_tuning`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization.utils import calculate_range
from compressed_tensors.utils import (
    get_execution_device,
    match_named_modules,
    patch_attr,
    update_offload_parameter,
)
from loguru import logger
from tqdm import tqdm

from llmcompressor.core import active_session
from llmcompressor.modifiers.gptq.helpers import assign_batches
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.helpers import DisableQuantization, disable_cache, eval_context
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from qep_modifier.block_tuning import (
    DEFAULT_LEARNING_RATE,
    OffGrid,
    TuningOutcome,
    TuningSteps,
    checked_batches,
    checked_tuning,
    column_groups,
    dequantized_weight,
    gained,
    gained_norm_parameters,
    grid_codes,
    is_norm,
    latent_codes,
    norm_form,
    rounded_codes,
    token_relative_error,
)
from qep_modifier.checks import quantizes_weight
from qep_modifier.end_to_end import HeadInputs, batch_on, head_inputs, logit_loss
from qep_modifier.capture import (
    LayerPass,
    linear_with,
    LayerStreams,
    RecordedCalls,
)
from qep_modifier.distributed import (
    assign_owners,
    barrier,
    gather,
    publish,
    publish_values,
    rank,
    reduce_statistics,
    share_step,
    shared,
)
from qep_modifier.layer_forwards import PropagatedOutputs, SkippedCalibration, first_tensor
from qep_modifier.plan import Group, LayerPlan, TraceCall, expert_role, plan_layer, plan_subgraph
from qep_modifier.propagation import last_linear
from qep_modifier.quantize import GroupQuantizer, QuantizeOutcome
from qep_modifier.reports import ErrorReport, ProblemLog
from qep_modifier.statistics import LinearStatistics, accumulate_batch
from qep_modifier.strength import StrengthPolicy, choices_summary, merged_choices

__all__ = ["CalibrationRun", "RunSettings", "RunSummary"]

Statistics = dict[torch.nn.Module, LinearStatistics]

# the fields a GroupQuantizer is built from (named as the modifier's fields)
_QUANTIZER_FIELDS = (
    "base", "group_scales", "first_order_strength", "first_order_reach", "refit_scales",
    "block_size", "dampening_frac", "correction_damping",
)


# block tuning: how many calibration batches (at most) measure whether it helped
_TUNING_CHECK_BATCHES = 8


@dataclass(frozen=True)
class RunSettings:
    """The recipe fields the run loop reads (named as the modifier's fields)."""

    true_sequential: bool
    cache_full_precision_inputs: bool
    resume_replays: bool
    stream_offload_device: str | None
    report_errors: bool
    block_tuning_epochs: int
    block_tuning_learning_rate: float
    block_tuning_code_learning_rate: float
    batched_quantization: bool
    block_size: int
    end_to_end_epochs: int
    end_to_end_learning_rate: float


@dataclass(frozen=True)
class RunSummary:
    """What a finished run leaves, the same on every rank."""

    error_report: list[dict] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    chosen_strengths: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationRun:
    """The state of one calibration run (see the module docstring).

    :param hooks: registers the layer passes' hooks (the modifier)
    :param layers: the decoder layers (sequential targets), in order
    :param layer_of: each target inside a layer -> its layer
    :param targets: the modules whose weights are quantized
    :param names: each target's name
    """

    hooks: object
    layers: list[torch.nn.Module]
    layer_names: Mapping[torch.nn.Module, str]
    layer_of: Mapping[torch.nn.Module, torch.nn.Module]
    targets: list[torch.nn.Module]
    names: Mapping[torch.nn.Module, str]
    strength: StrengthPolicy
    quantizer: GroupQuantizer
    settings: RunSettings
    calls: RecordedCalls
    skipped: SkippedCalibration = field(default_factory=SkippedCalibration)
    # layers whose pipeline propagation pass hands back the outputs QEP resumed
    propagated: PropagatedOutputs = field(default_factory=PropagatedOutputs)
    # statistics of the targets outside the layers (lm_head), from their pre-hook
    outside_statistics: Statistics = field(default_factory=dict)
    # the full-precision stream: each batch's input of the next layer
    full_precision_stream: list[torch.Tensor] | None = None
    # batch 1 input of the last skipped layer: see _check_propagated_input
    skipped_input: torch.Tensor | None = None
    quantized: set[torch.nn.Module] = field(default_factory=set)
    problems: ProblemLog = field(default_factory=ProblemLog)
    report: ErrorReport = field(default_factory=ErrorReport)
    # block tuning: layers tuned (each kept its tuning, or is noted "tuning_fallback")
    tuned_layers: int = 0
    # block tuning with code learning: each swept Linear's codes before rounding,
    # from its quantization until its layer is tuned
    unrounded_codes: dict[torch.nn.Module, torch.Tensor] = field(default_factory=dict)
    # end-to-end tuning: this rank's calibration batches and the full-precision
    # model's output-embedding inputs on them (recorded at calibration start)
    end_to_end_batches: list[dict] = field(default_factory=list)
    end_to_end_targets: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        hooks,
        layers: list[torch.nn.Module],
        layer_names: Mapping[torch.nn.Module, str],
        layer_of: Mapping[torch.nn.Module, torch.nn.Module],
        module_names: Mapping[torch.nn.Module, str],
        fields: Mapping,
    ) -> "CalibrationRun":
        """A run over the modules of ``module_names`` whose weights are quantized,
        with the recipe's ``fields`` (the modifier's, by name)."""
        targets = [module for module in module_names if quantizes_weight(module)]
        if not targets:
            raise ValueError(
                "QEPModifier found no modules to quantize: check `targets`, "
                "`ignore` and the scheme in the recipe"
            )
        names = {module: module_names[module] for module in targets}
        strength = StrengthPolicy.resolve(
            fields["propagation_strength"], names.values(), fields["correction_damping"]
        )
        return cls(
            hooks=hooks,
            layers=layers,
            layer_names=layer_names,
            layer_of=layer_of,
            targets=targets,
            names=names,
            strength=strength,
            quantizer=GroupQuantizer(
                names,
                strength,
                keep_unrounded=fields["block_tuning_code_learning_rate"] > 0,
                **{f: fields[f] for f in _QUANTIZER_FIELDS},
            ),
            settings=RunSettings(**{f.name: fields[f.name] for f in dataclasses.fields(RunSettings)}),
            calls=RecordedCalls(fields["stream_offload_device"]),
        )

    def __post_init__(self):
        paired_layers = [
            self.layers.index(self.layer_of[module])
            for module in self.targets
            if module in self.layer_of and self.needs_pairs(module)
        ]
        # after it, nothing needs the full-precision stream (unless tuning)
        self.last_paired_layer = max(paired_layers, default=-1)

    def needs_pairs(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` needs the full-precision stream beside ``X~``."""
        return self.settings.report_errors or self.strength.corrects(self.names[module])

    def accumulate_outside(self, module: torch.nn.Module, args: tuple) -> None:
        """Calibration-pass pre-hook of a target outside the layers (``lm_head``)."""
        if module not in self.outside_statistics:
            self.outside_statistics[module] = LinearStatistics.empty(module, get_execution_device(module))
        accumulate_batch({module: self.outside_statistics[module]}, {module: [args[0]]})

    # -------------------------------------------------------------- subgraph
    def calibrate_subgraph(self, modules: list[torch.nn.Module]) -> None:
        """Calibrate and quantize the layers of one pipeline subgraph, then its
        targets outside the layers."""
        subgraph = plan_subgraph(modules, self.layers, self.targets, self.layer_of.get)
        skipped = [self.skipped.remove(layer) for layer in subgraph.layers]
        quantized_hidden = None  # layers after the first: their input, propagated here
        for position, layer in enumerate(subgraph.layers):
            if position == 0:
                self._check_propagated_input(layer)
            last = position == len(subgraph.layers) - 1
            quantized_hidden = self.calibrate_layer(layer, quantized_hidden, propagate=not last)
        if subgraph.layers:
            last_layer = subgraph.layers[-1]
            self.skipped_input = (
                self.calls.hidden(last_layer, 1)
                if skipped[-1] and self.calls.num_batches(last_layer) > 1
                else None
            )
            for layer in subgraph.layers:
                self.calls.drop(layer)
        outside = [module for module in subgraph.outside if module not in self.quantized]
        if outside:
            self._quantize_outside(outside)

    def _quantize_outside(self, outside: list[torch.nn.Module]) -> None:
        statistics = {
            module: self.outside_statistics.pop(module, None)
            or LinearStatistics.empty(module, get_execution_device(module))
            for module in outside
        }
        reduce_statistics(statistics, outside)
        if rank() == 0:
            for module in outside:
                if self.strength.corrects(self.names[module]):
                    self.problems.note("outside", self.names[module])
        self.quantize_group(outside, statistics)

    # ------------------------------------------------------------ one layer
    def calibrate_layer(
        self,
        layer: torch.nn.Module,
        quantized_hidden: list[torch.Tensor] | None,
        propagate: bool,
    ) -> list[torch.Tensor] | None:
        """Plan, run, correct and quantize one layer (then tune it); its quantized
        outputs when ``propagate`` (the next layer of the same subgraph needs them)."""
        num_batches = self.calls.num_batches(layer)
        if num_batches == 0:
            raise RuntimeError(f"QEP: {self.layer_names[layer]} was not called during calibration")
        linears = [module for module in self.targets if self.layer_of.get(module) is layer]
        todo = [module for module in linears if module not in self.quantized]
        calls = partial(self._recorded_calls, layer)
        if self.strength.held_out is None and self.strength.any_auto:
            self.strength.split(self.calls.hidden(layer, batch) for batch in range(num_batches))
        with torch.no_grad(), disable_offloading():
            plan = self._plan_layer(layer, linears, todo, calls, quantized_hidden)
            streams = self._streams(layer, linears, todo, calls, quantized_hidden, plan)
            progress = tqdm(
                total=len(plan.groups) * num_batches,
                desc=f"QEP {self.layer_names[layer]}",
                leave=False,
            )
            for group in plan.groups:
                self._calibrate_group(streams, group, progress)
            progress.close()
            self.full_precision_stream = streams.finish()
            if self.settings.block_tuning_epochs and todo:
                self.tune_layer(layer, todo, streams.quantized_calls(), self.full_precision_stream)
            outputs = streams.outputs()
            if outputs is None:
                return streams.propagate() if propagate else None
            self.propagated.install(layer, self._quantized_inputs(layer, quantized_hidden), outputs)
            return [first_tensor(output) for output in outputs] if propagate else None

    def _quantized_inputs(self, layer, quantized_hidden: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Each batch's quantized-stream input of ``layer`` (on ``stream_offload_device``)."""
        if quantized_hidden is None:
            quantized_hidden = [self.calls.hidden(layer, batch) for batch in range(self.calls.num_batches(layer))]
        device = self.settings.stream_offload_device
        return [hidden.to(device) if device is not None else hidden for hidden in quantized_hidden]

    def _streams(self, layer, linears, todo, calls, quantized_hidden, plan) -> LayerStreams:
        """The layer's two streams; they take over the full-precision stream."""
        tuned = self.settings.block_tuning_epochs > 0 and bool(todo)  # the kept outputs go stale
        streams = LayerStreams(
            self.hooks,
            layer,
            linears,
            calls,
            quantized_hidden=quantized_hidden,
            full_precision_hidden=self.full_precision_stream,
            plan=plan,
            final=[module for module in linears if module not in todo],
            stream_needed=self.settings.block_tuning_epochs > 0
            or self.layers.index(layer) < self.last_paired_layer,
            cache_full_precision=self.settings.cache_full_precision_inputs,
            resume=self.settings.resume_replays,
            offload_device=self.settings.stream_offload_device,
            last=None if tuned or not plan.groups else last_linear(layer, plan.groups[-1].modules),
        )
        self.full_precision_stream = None  # the streams own it now
        return streams

    def _calibrate_group(self, streams: LayerStreams, group: Group, progress) -> None:
        """Accumulate ``group``'s statistics over the batches and the ranks, then
        quantize it."""
        statistics = self._empty_statistics(group)
        held_out = self._empty_statistics(group, held_out=True)
        for batch, (quantized, full_precision) in enumerate(streams.inputs(group)):
            accumulate_batch(statistics, quantized, full_precision)
            if held_out and self.strength.held_out[batch]:
                accumulate_batch(held_out, quantized, full_precision)
            progress.update(1)
        streams.quantizing(group)  # before any rank's owner writes a weight
        reduce_statistics(statistics, group.modules)  # sums over ranks
        reduce_statistics(held_out, group.modules)
        self.quantize_group(list(group.modules), statistics, held_out)

    def _recorded_calls(self, layer: torch.nn.Module):
        for batch in range(self.calls.num_batches(layer)):
            yield (batch, *self.calls.fetch(layer, batch))

    def _plan_layer(self, layer, linears, todo, calls, quantized_hidden) -> LayerPlan:
        """Trace the layer on its first batch and group ``todo`` from the trace."""
        if not todo:
            return LayerPlan(groups=(), call_order={})
        batch, args, kwargs = next(calls())
        hidden = None if quantized_hidden is None else quantized_hidden[batch]
        with LayerPass(self.hooks, layer, linears, capture=todo) as traced:
            traced.run(batch, args, kwargs, hidden)
        # every rank plans from rank 0's trace, in a form that crosses processes
        index, keys = {module: i for i, module in enumerate(linears)}, {}
        trace = shared(
            [(index[call.module], keys.setdefault(call.input_key, len(keys))) for call in traced.trace]
        )
        return plan_layer(
            [TraceCall(linears[i], key) for i, key in trace],
            todo,
            role=lambda module: expert_role(self.names[module]),
            paired=self.needs_pairs,
            true_sequential=self.settings.true_sequential,
        )

    def _empty_statistics(self, group: Group, held_out: bool = False) -> Statistics:
        """Zeros for ``group``: every module's statistics over all batches, or,
        with ``held_out``, those of the held-out batches of ``auto`` modules."""
        modules = [
            m for m in group.modules
            if not held_out or (group.paired and self.strength.is_auto(self.names[m]))
        ]
        report = self.settings.report_errors
        return {
            module: LinearStatistics.empty(
                module,
                get_execution_device(module),
                cross_term=group.paired and (self.strength.corrects(self.names[module]) or report),
                full_precision_gram=group.paired and (report or held_out),
            )
            for module in modules
        }

    def _check_propagated_input(self, layer: torch.nn.Module) -> None:
        """Refuse ``propagate_error=False``: the pipeline then feeds each layer the
        calibration pass's output, computed before quantization.

        Seen two ways: the quantized stream equals the full-precision one bit for
        bit although modules before were quantized (the first batch, which every
        layer computes for real), or a batch of a layer that computed only its
        first batch comes back unchanged as the next layer's input.
        """
        if self.calls.num_batches(layer) == 0:
            return
        hidden = self.calls.hidden(layer, 0)
        stream = self.full_precision_stream
        same_as_full_precision = (
            self.quantized
            and stream
            and stream[0].shape == hidden.shape
            and torch.equal(stream[0].to(hidden.device), hidden)
        )
        same_as_skipped = False
        if self.skipped_input is not None and self.calls.num_batches(layer) > 1:
            second = self.calls.hidden(layer, 1)
            same_as_skipped = second.shape == self.skipped_input.shape and torch.equal(
                second, self.skipped_input.to(second.device)
            )
        if same_as_full_precision or same_as_skipped:
            raise RuntimeError(
                "QEP needs oneshot's propagate_error=True (its default): with "
                "propagate_error=False each layer is fed the previous layer's output "
                "before quantization, so there is no quantized stream to correct for"
            )

    # ----------------------------------------------------------- quantizing
    def quantize_group(
        self,
        modules: Sequence[torch.nn.Module],
        statistics: Mapping[torch.nn.Module, LinearStatistics],
        held_out: Mapping[torch.nn.Module, LinearStatistics] | None = None,
    ) -> None:
        """Correct, observe and quantize ``modules``; round to nearest those that
        saw no token. Under torch.distributed each unit (a GPTQ batch of
        same-shape modules as one process forms it, or a module without tokens)
        is done by one owner rank, then published to all (with the codes before
        rounding when block tuning moves the codes)."""
        modules = [m for m in modules if m not in self.quantized]
        fed = [m for m in modules if m in statistics and statistics[m].tokens > 0]
        self.report.order += [
            self.names[m] for m in fed if statistics[m].full_precision_gram is not None
        ]
        units = self._sweep_batches(fed) + [[m] for m in modules if m not in fed]
        owners = assign_owners(units)
        mine = [unit for unit, owner in zip(units, owners) if owner == rank()]
        self._take(
            self.quantizer.round_uncalibrated([m for unit in mine for m in unit if m not in fed])
        )
        swept = self.quantizer.quantize([unit for unit in mine if unit[0] in fed], statistics, held_out or {})
        self._take(swept)
        owner_of = {m: owner for unit, owner in zip(units, owners) for m in unit}
        publish(modules, owner_of)
        if self.quantizer.keep_unrounded:
            tuned = [m for m in fed if m in self.layer_of]  # the same on every rank
            self.unrounded_codes.update(publish_values(swept.unrounded_codes, tuned, owner_of))
        self.quantized.update(modules)

    def _take(self, outcome: QuantizeOutcome) -> None:
        self.problems.extend(outcome.problems)
        self.report.rows.update(outcome.rows)

    def _sweep_batches(self, modules: list[torch.nn.Module]) -> list[list[torch.nn.Module]]:
        """GPTQ's batches of same-shape modules, formed once (rank 0's, which may
        depend on its free accelerator memory) so every rank sweeps the same."""
        batches = assign_batches(modules, self.settings.batched_quantization, self.settings.block_size)
        index = {module: i for i, module in enumerate(modules)}
        shape = shared([[index[module] for module in batch] for batch in batches])
        return [[modules[i] for i in batch] for batch in shape]

    # ---------------------------------------------------------- block tuning
    def tune_layer(self, layer, linears, calls, targets) -> None:
        """Block tuning (``block_tuning_epochs``): Adam steps on ``linears``'
        group scales and the layer's norm weights, so the layer's output on
        each batch's quantized-stream call (``calls()``) matches ``targets``
        (the full-precision layer's outputs); then the tuned scales, weights and
        norm weights are written back (:mod:`qep_modifier.block_tuning`), unless
        tuning did not lower the layer's loss (:func:`keeps_tuning`): then the
        layer keeps what it had, and the summary says so. With
        ``block_tuning_code_learning_rate`` the codes are tuned too (latent
        codes, their rate falling linearly to 0 over the steps)."""
        code_rate = self.settings.block_tuning_code_learning_rate
        unrounded = {module: self.unrounded_codes.pop(module, None) for module in linears}
        block = _TunedBlock(
            layer, {module: self.names[module] for module in linears}, unrounded if code_rate > 0 else None
        )
        for name, why in block.untuned_norms.items():
            self.problems.note("norm_untuned", f"{self.layer_names[layer]}.{name}")
            logger.debug(f"QEP block tuning: {self.layer_names[layer]}.{name} not tuned: {why}")
        steps = self._tuning_steps(self.calls.num_batches(layer))
        epochs = self.settings.block_tuning_epochs
        progress = tqdm(total=steps.work(epochs), desc=f"QEP tuning {self.layer_names[layer]}", leave=False)

        def loss(call) -> torch.Tensor:
            batch, args, kwargs, hidden = call
            output = block.output(self.hooks, batch, args, kwargs, hidden)
            return token_relative_error(output, targets[batch].to(output.device))

        rate, decaying = self.settings.block_tuning_learning_rate, None
        if code_rate > 0:  # one rate per parameter; the codes' rate falls linearly to 0
            codes = block.code_flags()
            rate = [code_rate if is_code else rate for is_code in codes]
            decaying = (codes, len(steps.owners))
        outcome = checked_tuning(
            block.parameters(), calls, loss, epochs, rate, steps, share_step, gather, decaying, progress
        )
        progress.close()
        self.tuned_layers += 1
        self._keep_or_fall_back(
            block, outcome, "tuning_fallback", self.layer_names[layer],
            f"{self.layer_names[layer]}: mean relative output error per token",
        )

    def _tuning_steps(self, num_batches: int) -> TuningSteps:
        """Which rank holds each tuning step's batch, and which of this rank's
        ``num_batches`` batches measure whether tuning helped (block tuning and
        end-to-end tuning alike).

        One step per calibration batch, rank 0's batches first, then rank 1's,
        ...: the order of one process given the ranks' shards one after the
        other. Whether tuning helped is the mean loss at the parameters it ends
        with against the mean loss before any step, on the same batches (up to
        ``_TUNING_CHECK_BATCHES`` of them, spread over the steps), each measured
        in a pass of its own. The losses the tuning passes see cannot stand in
        for either: each is measured before its own batch's step, at parameters
        that move from batch to batch, so only the first batch of the first pass
        sees the start, and with few batches the early steps weigh on a pass's
        mean while the parameters at its end are better (tiny Llama, 2 batches:
        0.0016 before, 0.0017 during the pass, 0.0012 after). The two passes
        cost about a third of a tuning epoch at 32 batches, all of one at 8."""
        counts = gather(num_batches)
        step_owners = [owner for owner, count in enumerate(counts) for _ in range(count)]
        first_step = sum(counts[: rank()])
        checked = [
            step - first_step
            for step in checked_batches(len(step_owners), _TUNING_CHECK_BATCHES)
            if step_owners[step] == rank()
        ]
        return TuningSteps(step_owners, rank(), checked)

    def _keep_or_fall_back(
        self, block: "_TunedBlock", outcome: TuningOutcome, reason: str, name: str, measure: str
    ) -> None:
        """Write the tuned values back, or note (``reason``) that ``name`` keeps
        its untuned scales and norm weights (they were never written); wait for
        every rank; log the ``measure`` before and after."""
        if outcome.kept:
            block.write_back()
        else:
            self.problems.note(reason, name)
        barrier()  # every rank wrote the same values; none propagates before all have
        if outcome.history and rank() == 0:  # the same on every rank
            logger.info(f"QEP: {'tuned' if outcome.kept else 'kept the untuned'} {measure} {outcome.describe()}")

    def _warn_tuning_never_kept(self) -> None:
        """A learning rate with which no tuned layer got better: one warning."""
        fell_back = len(self.problems.by_reason.get("tuning_fallback", ()))
        if not self.tuned_layers or fell_back < self.tuned_layers:
            return
        rate = self.settings.block_tuning_learning_rate
        advice = (
            f"is likely too large (the default is {DEFAULT_LEARNING_RATE})"
            if rate > DEFAULT_LEARNING_RATE
            else f"did not help here (the default is {DEFAULT_LEARNING_RATE}; "
            "block_tuning_epochs: 0 turns tuning off)"
        )
        code_rate = self.settings.block_tuning_code_learning_rate
        codes = f" (with block_tuning_code_learning_rate: {code_rate}, also try a smaller one)" if code_rate > 0 else ""
        logger.warning(
            f"QEP: block tuning lowered the output error of none of the "
            f"{self.tuned_layers} tuned layer(s), so all kept their untuned scales and "
            f"norm weights: block_tuning_learning_rate: {rate} {advice}{codes}"
        )

    # ------------------------------------------------------ end-to-end tuning
    def record_end_to_end_targets(self, model: torch.nn.Module, head: torch.nn.Module, dataloader) -> None:
        """Before anything is quantized: keep this rank's calibration batches and
        the full-precision model's output-embedding input on each (on
        ``stream_offload_device``), every other hook silenced."""
        keep_on = self.settings.stream_offload_device or "cpu"
        self.end_to_end_batches = [batch_on(batch, keep_on) for batch in dataloader]
        with HooksMixin.disable_hooks(), DisableQuantization(model), disable_cache(model), eval_context(model):
            self.end_to_end_targets = head_inputs(
                model, head, self.end_to_end_batches, _input_device(model), keep_on
            )

    def tune_end_to_end(self, model: torch.nn.Module, head: torch.nn.Module) -> None:
        """End-to-end tuning (``end_to_end_epochs``, :mod:`qep_modifier.end_to_end`):
        Adam steps on every quantized Linear's group scales (but the output
        embedding's) and every norm's output gain, so that the model's
        output-embedding logits on this rank's ``batches`` match those of the
        full-precision inputs ``targets``; written back only if the mean KL
        divergence on the checked batches went down (else "end_to_end_fallback")."""
        batches, targets = self.end_to_end_batches, self.end_to_end_targets
        linears = {m: self.names[m] for m in self.targets if m in self.quantized and m is not head}
        block = _TunedBlock(model, linears)
        for name, why in block.untuned_norms.items():
            self.problems.note("norm_untuned", name)
            logger.debug(f"QEP end-to-end tuning: {name} not tuned: {why}")
        steps = self._tuning_steps(len(batches))
        epochs = self.settings.end_to_end_epochs
        progress = tqdm(total=steps.work(epochs), desc="QEP end-to-end tuning", leave=False)
        device = _input_device(model)
        recorder = HeadInputs(model, head)
        loss = logit_loss(
            block,
            lambda hidden: linear_with(head.weight, head, hidden),  # its forward points at meta here
            lambda index: recorder(batch_on(batches[index], device)),
            targets,
        )
        tuned = block.parameters()
        with contextlib.ExitStack() as stack:
            for parameter in [p for p in model.parameters() if p.requires_grad]:  # only the gains take gradients
                stack.enter_context(patch_attr(parameter, "requires_grad", False))
            outcome = checked_tuning(
                tuned,
                lambda: range(len(batches)),
                loss,
                epochs,
                [self.settings.end_to_end_learning_rate] * len(tuned),
                steps,
                share_step,
                gather,
                ([True] * len(tuned), len(steps.owners)),
                progress,
            )
        progress.close()
        self.end_to_end_batches, self.end_to_end_targets = [], []
        self._keep_or_fall_back(block, outcome, "end_to_end_fallback", "model", "model: mean KL divergence per token")

    # ----------------------------------------------------------------- end
    def summarise(self) -> RunSummary:
        """Every rank's report rows, problems and ``auto`` choices merged (the same
        on every rank); rank 0 logs one summary."""
        problems = ProblemLog.merged(ProblemLog(part) for part in gather(self.problems.by_reason))
        chosen = merged_choices(gather(self.strength.chosen))
        summary = RunSummary(
            error_report=self.report.merged(gather(self.report.rows)),
            problems=problems.as_dict(),
            chosen_strengths=chosen,
        )
        if rank() == 0:
            problems.warn()
            self._warn_tuning_never_kept()
            if (line := choices_summary(chosen)) is not None:
                logger.info(line)
        return summary


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's execution device."""
    return get_execution_device(model.get_input_embeddings())


class _TunedBlock:
    """A layer's tunable parameters for block tuning: a gain on each quantized
    Linear's scales (codes and zero points held) and on each norm's output (the
    norms whose :func:`norm_form` an output gain can stand for); with ``unrounded``
    (code learning), also each Linear's latent codes, started from its unrounded
    codes (or its codes where it has none) and rounded to the scheme's range in
    every forward."""

    def __init__(
        self,
        layer: torch.nn.Module,
        names: Mapping[torch.nn.Module, str],
        unrounded: Mapping[torch.nn.Module, torch.Tensor | None] | None = None,
    ):
        self.layer = layer
        self.grids = {}
        # each Linear's latent codes and the scheme's range (code learning only)
        self.latent: dict[torch.nn.Module, tuple[torch.Tensor, float, float]] = {}
        for module, name in names.items():
            # copies (read before any rank writes: under torch.distributed the ranks
            # may share one CPU copy, and each rank writes the same tuned values into it)
            scale = module.weight_scale.detach().to(torch.float32, copy=True)
            zero_point = module.weight_zero_point.detach()
            groups = column_groups(module.in_features, scale, getattr(module, "weight_g_idx", None))
            try:
                codes = grid_codes(module.weight.detach(), scale, zero_point, groups)
            except OffGrid as off:
                raise RuntimeError(f"QEP block tuning: {name}: {off}") from off
            gain = torch.zeros_like(scale, requires_grad=True)
            self.grids[module] = (codes, scale, zero_point, groups, gain)
            if unrounded is not None:
                start = unrounded.get(module)
                start = codes if start is None else start.to(device=codes.device, dtype=codes.dtype)
                lowest, highest = calculate_range(module.quantization_scheme.weights, codes.device)
                latent = latent_codes(codes, start).requires_grad_(True)
                self.latent[module] = (latent, float(lowest), float(highest))
        # every norm of the layer is tuned through an output gain when the gain is a
        # change of its weight and bias (norm_form); the others are left as they are
        # and named (untuned_norms: "norm_untuned" in the run's problems)
        self.norms, self.norm_forms, self.untuned_norms = {}, {}, {}
        for name, module in layer.named_modules():
            if not is_norm(module):
                continue
            form = norm_form(module)
            if isinstance(form, str):
                self.untuned_norms[name] = f"{type(module).__name__}: {form}"
                continue
            self.norms[module] = torch.ones_like(module.weight, dtype=torch.float32, requires_grad=True)
            self.norm_forms[module] = form
        self.norm_weights = {norm: norm.weight.detach().to(torch.float32).clone() for norm in self.norms}
        self.norm_biases = {
            norm: norm.bias.detach().to(torch.float32).clone()
            for norm, form in self.norm_forms.items()
            if form.bias
        }

    def parameters(self) -> list[torch.Tensor]:
        """The gains, the norms' gains, then the latent codes (if any)."""
        return (
            [gain for *_, gain in self.grids.values()]
            + list(self.norms.values())
            + [latent for latent, _, _ in self.latent.values()]
        )

    def code_flags(self) -> list[bool]:
        """Which of :meth:`parameters` are latent codes."""
        return [False] * (len(self.grids) + len(self.norms)) + [True] * len(self.latent)

    def scales(self) -> dict[torch.nn.Module, torch.Tensor]:
        return {module: scale * gain.exp() for module, (_, scale, _, _, gain) in self.grids.items()}

    def codes(self, module: torch.nn.Module) -> torch.Tensor:
        """``module``'s integer codes: held, or its latent codes rounded."""
        if module not in self.latent:
            return self.grids[module][0]
        latent, lowest, highest = self.latent[module]
        return rounded_codes(latent, lowest, highest)

    def weights(self, scales) -> dict[torch.nn.Module, torch.Tensor]:
        return {
            module: dequantized_weight(self.codes(module), scales[module], zero_point, groups)
            for module, (_, _, zero_point, groups, _) in self.grids.items()
        }

    def _gained_norms(self, stack: contextlib.ExitStack) -> None:
        """Each tuned norm computes with its output gain while ``stack`` is open."""
        for norm, norm_gain in self.norms.items():
            stack.enter_context(patch_attr(norm, "forward", partial(gained, norm.forward, norm_gain)))

    def output(self, hooks, batch, args, kwargs, hidden) -> torch.Tensor:
        """The layer's output on one recorded call, with the tuned parameters."""
        with contextlib.ExitStack() as stack:
            self._gained_norms(stack)
            plain = stack.enter_context(
                LayerPass(hooks, self.layer, (), weights=self.weights(self.scales()))
            )
            return first_tensor(plain.run(batch, args, kwargs, hidden)[1])

    @contextlib.contextmanager
    def tuned_forward(self):
        """Any forward through the Linears and norms computes with the tuned
        parameters (end-to-end tuning runs the whole model in it)."""
        with contextlib.ExitStack() as stack:
            self._gained_norms(stack)
            for module, weight in self.weights(self.scales()).items():
                stack.enter_context(patch_attr(module, "forward", partial(linear_with, weight, module)))
            yield

    def write_back(self) -> None:
        """The tuned scales, weights (on the tuned codes) and norm weights into
        the modules."""
        with torch.no_grad():
            scales = self.scales()
            for module, weight in self.weights(scales).items():
                update_offload_parameter(module, "weight", weight.to(module.weight.dtype))
                update_offload_parameter(module, "weight_scale", scales[module].to(module.weight_scale.dtype))
            for norm, norm_gain in self.norms.items():
                weight, bias = gained_norm_parameters(
                    self.norm_forms[norm], self.norm_weights[norm], self.norm_biases.get(norm), norm_gain
                )
                update_offload_parameter(norm, "weight", weight.to(norm.weight.dtype))
                if bias is not None:
                    update_offload_parameter(norm, "bias", bias.to(norm.bias.dtype))


@dataclass(frozen=True)
class DecoderLayers:
    """The model's decoder layers (the sequential targets), resolved once at
    ``on_initialize``: each layer's name and each target Linear's layer."""

    layers: list[torch.nn.Module]
    names: Mapping[torch.nn.Module, str]
    layer_of: Mapping[torch.nn.Module, torch.nn.Module]

    @classmethod
    def find(
        cls, model: torch.nn.Module, sequential_targets, module_names: Mapping[torch.nn.Module, str]
    ) -> "DecoderLayers":
        sequential_targets = infer_sequential_targets(model, sequential_targets)
        named_layers = list(match_named_modules(model, sequential_targets))
        layers = [layer for _, layer in named_layers]
        if any(layer in module_names for layer in layers):
            raise ValueError(
                f"QEPModifier needs sequential targets that contain the Linears it "
                f"quantizes (decoder layers); sequential_targets={sequential_targets} "
                "matches target modules themselves"
            )
        layer_of = {
            module: layer for layer in layers for module in layer.modules() if module in module_names
        }
        return cls(layers, {layer: name for name, layer in named_layers}, layer_of)


def calibration_output_unread(modifier, outside: list[torch.nn.Module]) -> bool:
    """Whether nothing but ``modifier`` reads the pipeline's calibration pass, so
    that the layers may compute only its first batch (QEP records the calls and
    runs the layers itself; the pipeline throws that pass's output away).

    Not when another modifier of the recipe calibrates (modifiers that need no
    calibration data, such as SpinQuant's fused rotations, read nothing), when a
    quantized module lies outside every layer (a quantized ``lm_head`` reads the
    last layer's calibration output), or with a KV-cache scheme.
    """
    if outside or getattr(modifier, "kv_cache_scheme", None) is not None:
        return False
    recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = getattr(recipe, "modifiers", None) or []
    return all(
        other is modifier or not getattr(other, "requires_calibration_data", True)
        for other in modifiers
    )
