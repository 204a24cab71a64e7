"""Correct, observe and quantize a group of Linears: one :class:`GroupQuantizer`
per calibration run, built from the recipe's fields, with its sweep chosen once.

For each module with statistics (:mod:`qep_modifier.statistics`):

1. **correct**: ``W* = W + a W C (H~ + l I)^-1`` (:mod:`qep_modifier.correction`,
   ``a`` from the :class:`~qep_modifier.strength.StrengthPolicy`);
2. **observe**: the weight observer's scales on ``W*``;
3. **quantize**: the GPTQ sweep with ``H~`` (FOEM's term when
   ``first_order_strength > 0``; group scales from the sweep with
   ``group_scales: sweep``; :mod:`qep_modifier.gptq_sweep`), its scales refitted
   to its codes ``refit_scales`` times, or round to nearest (``base: rtn``);
4. **report** (``report_errors``): ``||W X - V X~|| / ||W X||`` of the original,
   corrected and quantized weights.

What went wrong for a module and the report rows come back in a
:class:`QuantizeOutcome`. Which rank quantizes which modules, and publishing
the result to the others, is the caller's (:mod:`qep_modifier.calibrate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import fake_quantize
from compressed_tensors.utils import getattr_chain, update_offload_parameter
from loguru import logger

from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, prepare_batch, update_batch_qparams
from llmcompressor.modifiers.quantization.calibration import observe
from llmcompressor.utils.metric_logging import CompressionLogger

from qep_modifier.block_tuning import column_groups, unrounded_codes
from qep_modifier.correction import CorrectionFailed, corrected_weight, relative_output_errors
from qep_modifier.gptq_sweep import (
    quantize_weight_first_order,
    quantize_weight_group_scales,
    refit_group_scales,
)
from qep_modifier.reports import ProblemLog
from qep_modifier.statistics import LinearStatistics
from qep_modifier.strength import AUTO, StrengthPolicy

__all__ = ["GroupQuantizer", "QuantizeOutcome"]

Modules = list[torch.nn.Module]
Statistics = Mapping[torch.nn.Module, LinearStatistics]


@dataclass
class QuantizeOutcome:
    """What one call of :class:`GroupQuantizer` found: problems by reason,
    ``report_errors`` rows by module name and, with ``keep_unrounded``, each
    swept module's codes before rounding (``weight / scale + zero_point`` of
    the weights the sweep rounded; block tuning's latent codes start there)."""

    problems: ProblemLog = field(default_factory=ProblemLog)
    rows: dict[str, dict] = field(default_factory=dict)
    unrounded_codes: dict[torch.nn.Module, torch.Tensor] = field(default_factory=dict)


class GroupQuantizer:
    """The recipe's correction and quantization, for modules this rank owns.

    :param names: each target module's name
    :param strength: the run's propagation strengths (``auto`` chooses there)
    :param base: ``gptq`` or ``rtn``
    :param group_scales: ``observer`` or ``sweep`` (group strategy only)
    :param first_order_strength, first_order_reach: FOEM's ``beta`` and reach
    :param refit_scales: refits of each module's scales to its sweep's codes
    :param block_size, dampening_frac, correction_damping: the sweep's block
        width and damping, the correction's damping
    :param keep_unrounded: the GPTQ sweep (observer scales) keeps each module's
        codes before rounding in the outcome (``block_tuning_code_learning_rate``);
        the sweep is then always :func:`~qep_modifier.gptq_sweep.quantize_weight_first_order`
        (with ``beta = 0`` the toolkit's eager sweep, operation for operation)
    """

    def __init__(
        self,
        names: Mapping[torch.nn.Module, str],
        strength: StrengthPolicy,
        *,
        base: str,
        group_scales: str,
        first_order_strength: float,
        first_order_reach: str,
        refit_scales: int,
        block_size: int,
        dampening_frac: float,
        correction_damping: float,
        keep_unrounded: bool = False,
    ):
        self.names, self.strength = names, strength
        self.refit_scales = refit_scales
        self.block_size, self.dampening_frac = block_size, dampening_frac
        self.correction_damping = correction_damping
        self.scales_from_sweep = group_scales == "sweep"
        self.first_order = dict(
            first_order_strength=first_order_strength, first_order_reach=first_order_reach
        )
        self.keep_unrounded = keep_unrounded
        # the sweep, once: the toolkit's own with beta = 0, FOEM's otherwise
        # (and whenever the unrounded weights are kept: the toolkit's cannot)
        self.column_sweep = (
            partial(quantize_weight_first_order, **self.first_order)
            if first_order_strength > 0 or keep_unrounded
            else quantize_weight
        )
        self.quantize_batches = self._round_batches if base == "rtn" else self._sweep_batches

    # ------------------------------------------------------------------ api
    def quantize(
        self, batches: list[Modules], statistics: Statistics, held_out: Statistics
    ) -> QuantizeOutcome:
        """Correct, observe and quantize ``batches`` (GPTQ's batches of same-shape
        modules); every module has statistics with tokens."""
        outcome = QuantizeOutcome()
        modules = [module for batch in batches for module in batch]
        if not modules:
            return outcome
        with torch.no_grad(), disable_offloading():
            report = {}
            for module in modules:
                stats = statistics[module]
                if stats.full_precision_gram is not None:
                    report[module] = (module.weight.detach().clone(), *stats.normalised())
            for module in modules:
                self._correct(module, statistics[module], held_out.get(module), outcome.problems)
            corrected = {module: module.weight.detach().clone() for module in report}
            observe(modules, base_name="weight")  # weight-only: no activation observers
            self.quantize_batches(batches, statistics, outcome)
            for module, (weight, hessian, cross_term, gram) in report.items():
                outcome.rows[self.names[module]] = self._report_row(
                    module, [weight, corrected[module], module.weight.detach()], gram, cross_term, hessian
                )
        return outcome

    def round_uncalibrated(self, modules: Modules) -> QuantizeOutcome:
        """Modules that saw no token: their observer on their own weights, then
        round to nearest."""
        outcome = QuantizeOutcome()
        if not modules:
            return outcome
        with torch.no_grad(), disable_offloading():
            observe(modules, base_name="weight")
            self._round_batches([modules], {}, outcome)
        for module in modules:
            outcome.problems.note("uncalibrated", self.names[module])
        return outcome

    # ------------------------------------------------------------ correction
    def _correct(self, module, stats: LinearStatistics, held_out, problems: ProblemLog) -> None:
        name = self.names[module]
        if not self.strength.corrects(name):
            return
        if not stats.paired:
            problems.note("unpaired", name)
            return
        if stats.cross_term is None:
            return
        strength = self.strength.strength(name)
        if strength == AUTO:
            strength, fell_back = self.strength.choose(name, module.weight, stats, held_out)
            if fell_back:
                problems.note("auto_fallback", name)
            if strength == 0.0:
                return
        hessian, cross_term, _ = stats.normalised()
        try:
            weight, _ = corrected_weight(
                module.weight,
                cross_term,
                hessian,
                propagation_strength=strength,
                correction_damping=self.correction_damping,
            )
        except CorrectionFailed as failure:
            logger.debug(f"QEP: {name} left uncorrected: {failure}")
            problems.note("uncorrected", name)
            return
        update_offload_parameter(module, "weight", weight)

    def _report_row(self, module, candidates, gram, cross_term, hessian) -> dict:
        errors = dict(
            zip(
                ("before", "corrected", "quantized"),
                relative_output_errors(candidates[0], candidates, gram, cross_term, hessian),
            )
        )
        name = self.names[module]
        if not self.strength.corrects(name):
            errors["corrected"] = None
        return {"name": name, **errors}

    # ---------------------------------------------------------- quantization
    def _round_batches(self, batches: list[Modules], statistics, outcome: QuantizeOutcome) -> None:
        """Round to the observer's grid (``base: rtn``, or no statistics)."""
        for module in (module for batch in batches for module in batch):
            quant_args = getattr_chain(module, "quantization_scheme.weights")
            qparams = module.weight_observer.get_qparams()
            quantized = fake_quantize(
                module.weight,
                qparams["scale"],
                qparams["zero_point"],
                quant_args,
                global_scale=qparams.get("global_scale"),
            )
            update_offload_parameter(module, "weight", quantized)
            update_offload_parameter(module, "weight_scale", qparams["scale"].to(module.weight.dtype))
            update_offload_parameter(
                module, "weight_zero_point", qparams["zero_point"].to(quant_args.zp_dtype)
            )

    def _sweep_batches(self, batches: list[Modules], statistics: Statistics, outcome: QuantizeOutcome) -> None:
        for batch in batches:
            quant_args = getattr_chain(batch[0], "quantization_scheme.weights")
            if self.scales_from_sweep and quant_args.strategy == "group":
                self._sweep_with_group_scales(batch, statistics, quant_args, outcome.problems)
            else:
                self._sweep(batch, statistics, quant_args, outcome)

    def _sweep(self, batch: Modules, statistics: Statistics, quant_args, outcome: QuantizeOutcome) -> None:
        """The GPTQ sweep on one batch of same-shape modules, with FOEM's term
        when ``beta > 0``.

        Forked from the loop body of llm-compressor 0.14.0.1
        ``GPTQModifier.compress_module_list``. Differs in: the Hessians and sample
        counts come from ``statistics`` (never the modifier's private
        ``_hessians`` / ``_num_samples``); the batch is given (formed by the
        toolkit's ``assign_batches`` in :mod:`qep_modifier.calibrate`); the sweep
        is :func:`~qep_modifier.gptq_sweep.quantize_weight_first_order` when
        ``first_order_strength > 0`` (with 0, the toolkit's ``quantize_weight``
        as upstream); round-to-nearest fallbacks go to ``outcome.problems``;
        with ``keep_unrounded`` the last sweep's weights before rounding, as
        codes on the final grid, go to ``outcome.unrounded_codes``.
        """
        qparams = [module.weight_observer.get_qparams() for module in batch]
        logger.info(f"QEP: quantizing {[self.names[module] for module in batch]}")
        with contextlib.ExitStack() as loggers:
            weights, hessians, scales, zero_points, global_scales = prepare_batch(
                batch,
                qparams,
                {module: statistics[module].hessian for module in batch},
                {module: statistics[module].num_samples for module in batch},
            )
            metric_loggers = [loggers.enter_context(CompressionLogger(module)) for module in batch]
            # the sweep overwrites its inputs; a refit needs them afterwards
            keep_inputs = bool(self.refit_scales)
            unrounded = torch.empty_like(weights) if self.keep_unrounded else None
            asked = {} if unrounded is None else {"unrounded": unrounded}  # refilled by each sweep
            column_sweep = self.column_sweep
            if column_sweep is quantize_weight and bool((scales < 0).any()):
                # signed scales (the full_range_mse observer): the toolkit's fused
                # GPU block update clamps every scale to positive; ours is its eager
                # sweep operation for operation
                column_sweep = partial(quantize_weight_first_order, **self.first_order)

            def run_sweep(scales):
                return column_sweep(
                    weights=weights.clone() if keep_inputs else weights,
                    hessians=hessians.clone() if keep_inputs else hessians,
                    scale=scales,
                    zero_point=zero_points,
                    global_scale=global_scales,
                    quant_args=quant_args,
                    blocksize=self.block_size,
                    percdamp=self.dampening_frac,
                    **asked,
                )

            quantized, losses, fell_back = run_sweep(scales)
            if self.refit_scales:
                quantized, scales = self._refit_scales(batch, weights, hessians, quantized, scales, run_sweep)
            self._record_sweep(batch, metric_loggers, losses, fell_back, outcome.problems)
        update_batch_qparams(batch, quantized, scales, zero_points, global_scales, quant_args)
        if unrounded is not None:
            for index, module in enumerate(batch):
                outcome.unrounded_codes[module] = _codes_before_rounding(module, unrounded[index])

    def _refit_scales(self, batch, target, hessians, quantized, scales, run_sweep):
        """``refit_scales`` rounds: refit the scales to the sweep's codes, and
        before every further refit sweep again on the refitted grid."""
        storage = batch[0].weight.dtype
        shape = scales.shape
        as_groups = lambda tensor: tensor.reshape(shape[0], shape[1], -1)  # noqa: E731
        for round_ in range(self.refit_scales):
            if round_:
                quantized, _, _ = run_sweep(scales)
            refitted, quantized, errors = refit_group_scales(
                quantized, target, hessians, as_groups(scales),
                percdamp=self.dampening_frac, storage_dtype=storage,
            )
            scales = refitted.reshape(shape).to(scales.dtype)
            before, after = errors.sum(-1)
            for index, module in enumerate(batch):
                logger.debug(
                    f"QEP: {self.names[module]} scale refit {round_ + 1}: output "
                    f"error {before[index].item():.4g} -> {after[index].item():.4g}"
                )
        return quantized, scales

    def _sweep_with_group_scales(self, batch, statistics, quant_args, problems) -> None:
        """``group_scales: sweep``: each group's scale chosen by the module's
        observer when the sweep reaches the group."""

        def group_qparams(item: int, weights: torch.Tensor):
            observer = batch[item].weight_observer
            observer(weights)
            qparams = observer.get_qparams()
            return qparams["scale"], qparams["zero_point"]

        logger.info(f"QEP: quantizing {[self.names[m] for m in batch]} (group scales from the sweep)")
        _, hessians, _, _, _ = prepare_batch(
            batch,
            [module.weight_observer.get_qparams() for module in batch],
            {module: statistics[module].hessian for module in batch},
            {module: statistics[module].num_samples for module in batch},
        )
        weights = torch.stack([module.weight.detach() for module in batch]).to(GPTQ_PRECISION)
        with contextlib.ExitStack() as loggers:
            metric_loggers = [loggers.enter_context(CompressionLogger(m)) for m in batch]
            quantized, losses, fell_back, scales, zero_points = quantize_weight_group_scales(
                weights,
                hessians,
                quant_args,
                group_qparams,
                blocksize=self.block_size,
                percdamp=self.dampening_frac,
                **self.first_order,
            )
            self._record_sweep(batch, metric_loggers, losses, fell_back, problems)
        update_batch_qparams(batch, quantized, scales, zero_points, None, quant_args)

    def _record_sweep(self, batch, metric_loggers, losses, fell_back, problems: ProblemLog) -> None:
        """Each module's GPTQ loss to its metric logger; RTN fallbacks to ``problems``."""
        for index, metric_logger in enumerate(metric_loggers):
            metric_logger.set_results(name="QEP", loss=losses[index].item())
            if fell_back[index].item():
                problems.note("rtn_fallback", self.names[batch[index]])


def _codes_before_rounding(module: torch.nn.Module, unrounded: torch.Tensor) -> torch.Tensor:
    """A swept module's weights before rounding as codes on its stored grid
    (the scales and zero points just written, each column with its group's)."""
    scale = module.weight_scale.detach()
    groups = column_groups(unrounded.shape[-1], scale, getattr(module, "weight_g_idx", None))
    return unrounded_codes(unrounded, scale, module.weight_zero_point.detach().to(scale.device), groups)
