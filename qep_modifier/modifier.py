"""QEPModifier: quantization error propagation on top of llm-compressor's GPTQ.

Lifecycle (as GPTQModifier's, with the second stream added):

- ``on_initialize``: apply the quantization config, check the recipe, find the
  sequential targets (decoder layers) and each target Linear's layer.
- ``on_calibration_start``: observer hooks (toolkit), a forward pre-hook on
  each target Linear (X~ and X) and a forward hook on each sequential target
  (the full-precision re-run), all through ``HooksMixin``.
- ``on_sequential_epoch_end``: for each group of the layer (one group without
  ``true_sequential``): replay it if it is not the first (its statistics were
  deferred, see :mod:`qep_modifier.streams`), correct ``W -> W*``, observe
  scales on ``W*``, then run the base quantizer (GPTQ sweep with Hessian
  ``H~``, or RTN).
- ``on_calibration_end``: remove hooks, freeze quantization.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from functools import partial
from typing import Literal

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.offload.dist_utils import is_source_process as is_src
from compressed_tensors.quantization import QuantizationType, fake_quantize
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils import (
    get_execution_device,
    getattr_chain,
    match_named_modules,
    update_offload_parameter,
)
from loguru import logger
from pydantic import PrivateAttr, field_validator

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.gptq.helpers import (
    accumulate_hessian,
    assign_batches,
    make_empty_hessian,
    prepare_batch,
    update_batch_qparams,
)
from llmcompressor.modifiers.quantization.calibration import observe, update_qparams
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.observers import ACTIVATION_OBS
from llmcompressor.utils.metric_logging import CompressionLogger
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from qep_modifier.correction import (
    DEFAULT_STRENGTH_KEY,
    CorrectionFailed,
    accumulate_cross_term,
    corrected_weight,
    relative_output_error,
    resolve_propagation_strength,
)
from qep_modifier.gptq_sweep import quantize_weight_first_order
from qep_modifier.streams import DualStreamCapture

__all__ = ["QEPModifier", "FOEMModifier", "DEFAULT_PROPAGATION_STRENGTH"]

# The reference implementation corrects every Linear with strength 0.5 except
# the MLP down projection: its input is the widest in the block (the
# intermediate size), so its d_in x d_in solve is the most expensive and the
# least well conditioned, and correcting it did not pay off there.
DEFAULT_PROPAGATION_STRENGTH: dict[str, float] = {
    r"(^|\.)down_proj$": 0.0,
    DEFAULT_STRENGTH_KEY: 0.5,
}


class QEPModifier(GPTQModifier):
    """GPTQ (or RTN) on weights corrected for the error of earlier layers.

    Accepts every GPTQModifier field (``targets``, ``ignore``, ``scheme``,
    ``config_groups``, ``block_size``, ``dampening_frac``, ``actorder``), plus:

    :param propagation_strength: ``a`` in ``W* = W + a W C (H~ + l I)^-1``: a
        number in [0, 1], or a mapping from module-name regex (``re.search``,
        first match wins) to number, with key ``default`` for the rest. The
        default corrects everything at 0.5 except ``mlp.down_proj``.
    :param correction_damping: ``l`` as a fraction of ``mean(diag H~)``, > 0
    :param base: ``gptq`` (the GPTQ sweep on ``W*`` with Hessian ``H~``) or
        ``rtn`` (round ``W*`` to the observer's grid)
    :param true_sequential: quantize a layer's Linears group by group
        (modules sharing an input, in execution order) and recompute both
        streams' inputs for each later group
    :param first_order_strength: FOEM's ``beta`` in the GPTQ sweep, >= 0
        (0 is the plain GPTQ sweep)
    :param first_order_reach: which columns FOEM's first-order pull reaches
        when a column is quantized: ``next`` (the next column in sweep order,
        as the authors' code does) or ``all`` (every remaining column); see
        :mod:`qep_modifier.gptq_sweep`
    :param stream_offload_device: where the full-precision stream waits
        between layers; keep it equal to oneshot's ``sequential_offload_device``
    :param cache_full_precision_inputs: with ``true_sequential``, keep the
        full-precision inputs of a layer's later corrected groups from its
        calibration pass (on ``stream_offload_device``) instead of recomputing
        them in each group's replay: about a sixth less calibration compute for a
        Llama block, for one more activation cache per such group while the
        layer is calibrated. Results are the same either way.
    :param report_errors: after calibration, ``error_report`` lists for every
        module the relative output error ``||W X - V X~|| / ||W X||`` of the
        original weight, the corrected weight and the quantized weight (costs
        one more d_in x d_in accumulator per module in flight)
    """

    propagation_strength: float | dict[str, float] = dict(DEFAULT_PROPAGATION_STRENGTH)
    correction_damping: float = 0.01
    base: Literal["gptq", "rtn"] = "gptq"
    true_sequential: bool = True
    first_order_strength: float = 0.0
    first_order_reach: Literal["next", "all"] = "next"
    stream_offload_device: str | None = "cpu"
    cache_full_precision_inputs: bool = True
    report_errors: bool = False

    _cross_terms: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(
        default_factory=dict
    )
    _strengths: dict[torch.nn.Module, float] = PrivateAttr(default_factory=dict)
    _layers: list[torch.nn.Module] = PrivateAttr(default_factory=list)
    _linear_layer: dict[torch.nn.Module, torch.nn.Module] = PrivateAttr(
        default_factory=dict
    )
    _capture: DualStreamCapture | None = PrivateAttr(default=None)
    _uncorrected: list[str] = PrivateAttr(default_factory=list)
    _full_precision_grams: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(
        default_factory=dict
    )
    _error_report: list[dict] = PrivateAttr(default_factory=list)
    _unpaired: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    _unpaired_names: list[str] = PrivateAttr(default_factory=list)
    _uncalibrated: list[str] = PrivateAttr(default_factory=list)
    _token_counts: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _quantized: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    # per kind ("hessian", "cross_term"): the last inputs and their increment,
    # for the next module fed the very same tensors (q, k and v share one input)
    _shared_products: dict[str, tuple] = PrivateAttr(default_factory=dict)

    @property
    def error_report(self) -> list[dict]:
        """Per module: ``name``, ``before``, ``corrected`` (None if not
        corrected) and ``quantized`` relative output errors (``report_errors``)."""
        return list(self._error_report)

    # ------------------------------------------------------------ validation
    @field_validator("propagation_strength", mode="before")
    @classmethod
    def _check_propagation_strength(cls, value):
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for pattern, strength in items:
            where = "" if pattern is None else f"[{pattern!r}]"
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise ValueError(
                    f"propagation_strength{where} must be a number in [0, 1], "
                    f"got {strength!r}"
                )
            if not 0.0 <= float(strength) <= 1.0:
                raise ValueError(
                    f"propagation_strength{where} = {strength} is outside the "
                    "allowed range [0, 1]"
                )
            if pattern is not None and pattern != DEFAULT_STRENGTH_KEY:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(
                        f"propagation_strength pattern {pattern!r} is not a valid "
                        f"regular expression: {error}"
                    ) from error
        return value

    @field_validator("correction_damping")
    @classmethod
    def _check_correction_damping(cls, value):
        if not value > 0:
            raise ValueError(f"correction_damping must be > 0, got {value}")
        return value

    @field_validator("first_order_strength")
    @classmethod
    def _check_first_order_strength(cls, value):
        if not value >= 0:
            raise ValueError(f"first_order_strength must be >= 0, got {value}")
        return value

    # ------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        if is_distributed():
            raise NotImplementedError(
                "QEPModifier does not support torch.distributed calibration yet: "
                "run oneshot in a single process (offloading works there)"
            )
        super().on_initialize(state, **kwargs)
        self._check_weight_only_int()
        self._check_group_sizes()
        self._check_calibration_size(kwargs.get("calib_data"))

        targets = infer_sequential_targets(
            state.model, kwargs.get("sequential_targets")
        )
        self._layers = [
            module for _, module in match_named_modules(state.model, targets)
        ]
        self._linear_layer = {}
        for layer in self._layers:
            for module in layer.modules():
                if module in self._module_names:
                    self._linear_layer[module] = layer

        self._strengths = {
            module: resolve_propagation_strength(name, self.propagation_strength)
            for module, name in self._module_names.items()
        }
        self._warn_unmatched_patterns()
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)

        linears = [module for module in self._module_names if _quantizes_weight(module)]
        if not linears:
            raise ValueError(
                "QEPModifier found no modules to quantize: check `targets`, "
                "`ignore` and the scheme in the recipe"
            )
        corrected = self.report_errors or any(
            self._strengths[module] > 0 for module in linears
        )
        self._error_report = []
        self._capture = DualStreamCapture(
            layers=self._layers,
            linear_layer=self._linear_layer,
            on_quantized_input=self._accumulate_hessian,
            on_input_pair=self._accumulate_cross_term,
            offload_device=self.stream_offload_device,
            full_precision_stream=corrected,
            keep_layer_calls=self.true_sequential,
            on_unpaired=self._mark_unpaired,
            on_layer_order=self._defer_later_groups,
            cache_full_precision=self.cache_full_precision_inputs,
            skip_deferred_compute=self._calibration_output_unread(linears),
        )
        for module in linears:
            # a pre-hook: a replay can stop before its last Linear computes
            self.register_hook(module, self._linear_hook, "forward_pre")
        for layer in self._layers:
            self.register_hook(layer, self._layer_hook, "forward", with_kwargs=True)

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs
    ):
        targets = [
            module
            for module in modules
            if module in self._module_names
            and module not in self._quantized
            and is_module_quantized(module)
            and _quantizes_weight(module)
        ]
        self._capture.end_calibration_pass()
        # llm-compressor counts batches, not tokens: an expert the router never
        # chose has samples and an all-zero Hessian, which GPTQ turns into zeros
        # (deferred modules count their tokens in their replay)
        calibrated = [
            module
            for module in targets
            if self._token_counts.get(module, 0) > 0 or module in self._capture.deferred
        ]
        self._quantize_uncalibrated([m for m in targets if m not in calibrated])
        if not calibrated:
            return
        # modules outside every sequential target (a quantized lm_head in the
        # last subgraph) have no replay: their group comes last, from the
        # calibration pass
        outside = [m for m in calibrated if self._linear_layer.get(m) is None]
        layers = {self._linear_layer[m] for m in calibrated if m not in outside}
        layer = next(iter(layers)) if len(layers) == 1 else None
        groups = [calibrated]
        if self.true_sequential and layer is not None:
            inside = [module for module in calibrated if module not in outside]
            groups = self._groups(layer, inside)
        elif self.true_sequential and len(layers) > 1:
            if self._capture.deferred.intersection(calibrated):
                raise RuntimeError(
                    "QEP: true_sequential needs one sequential target per subgraph, "
                    f"and this subgraph calibrated Linears of {len(layers)}; set "
                    "`true_sequential: false`, or pass oneshot `sequential_targets` "
                    "that put one target in each subgraph"
                )
            logger.warning(
                "QEP: true_sequential needs one sequential target per subgraph; "
                "quantizing these modules in one group"
            )
        # the first group's statistics come from the calibration pass, unless it
        # holds a module that pass deferred to a replay
        replays = [
            index > 0 or bool(self._capture.deferred.intersection(group))
            for index, group in enumerate(groups)
        ]
        if groups[0] is not calibrated and outside:
            groups.append(outside)
            replays.append(False)
        # a later group's full-precision replay needs the earlier groups'
        # original weights; a group with no corrected module replays only the
        # quantized stream
        needs_pair = [self._needs_input_pairs(group) for group in groups]
        original_weights: dict[torch.nn.Module, torch.Tensor] = {}
        for index, group in enumerate(groups):
            replayed = replays[index]
            if replayed:
                for module in group:
                    self._forget_statistics(module)
                self._capture.replay_group(
                    layer, group, original_weights, full_precision=needs_pair[index]
                )
                self._clear_memos()
            if any(needs_pair[index + 1 :]) and not self.cache_full_precision_inputs:
                for module in group:
                    original_weights[module] = module.weight.detach().to(
                        self.stream_offload_device or module.weight.device, copy=True
                    )
            if replayed:  # the replay may route no token to a module (MoE)
                fed = [module for module in group if self._token_counts.get(module, 0)]
                self._quantize_uncalibrated([m for m in group if m not in fed])
                group = fed
            if group:
                self._correct_and_quantize(group)
        self._clear_memos()
        for layer in layers:
            if layer is not None:
                self._capture.end_layer(layer)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        if self._capture is not None:
            self._capture.reset()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._unpaired_names:
            logger.warning(
                "QEP: the full-precision and quantized streams sent different tokens to "
                f"{len(self._unpaired_names)} module(s) (mixture-of-experts routing), "
                "which were quantized without correction: "
                f"{', '.join(self._unpaired_names)}. oneshot's moe_calibrate_all_experts="
                "True (its default) feeds every expert every token and pairs them"
            )
        if self._uncalibrated:
            logger.warning(
                f"QEP: {len(self._uncalibrated)} module(s) saw no calibration token and "
                "were rounded to nearest from their own weights (no GPTQ, no "
                f"correction): {', '.join(self._uncalibrated)}"
            )
        self._unpaired, self._unpaired_names, self._uncalibrated = set(), [], []
        self._token_counts, self._quantized = {}, set()
        self._clear_memos()
        if self._uncorrected:
            logger.warning(
                "QEP: the correction was skipped (H~ + l I stayed indefinite) for "
                f"{len(self._uncorrected)} module(s), quantized from their original "
                f"weights: {', '.join(self._uncorrected)}"
            )
        self._cross_terms = {}
        self._full_precision_grams = {}
        self._capture = None
        self._uncorrected = []
        return super().on_finalize(state, **kwargs)

    # ----------------------------------------------------------------- hooks
    def _linear_hook(self, module, args):
        self._capture.linear_input(module, args[0])

    def _layer_hook(self, module, args, kwargs, output):
        batch_index = active_session().state.current_batch_idx
        self._capture.layer_output(module, args, kwargs, output, batch_index)

    def _accumulate_hessian(self, module: torch.nn.Module, inp: torch.Tensor):
        tokens = inp.numel() // max(1, inp.shape[-1])
        self._token_counts[module] = self._token_counts.get(module, 0) + tokens
        if module not in self._num_samples:
            self._hessians[module] = make_empty_hessian(
                module, device=get_execution_device(module)
            )
            self._num_samples[module] = torch.zeros(
                (), device=get_execution_device(module)
            )
        hessian, num_samples = self._hessians[module], self._num_samples[module]
        # the toolkit's own accumulation, into zeros: 0 + P is P exactly, so
        # adding the increment is bit for bit GPTQModifier's update
        increment, count = self._shared_product(
            "hessian",
            (inp,),
            hessian.shape,
            lambda: accumulate_hessian(
                inp, module, torch.zeros_like(hessian), torch.zeros_like(num_samples)
            ),
        )
        hessian += increment.to(hessian.device)
        num_samples += count.to(num_samples.device)

    def _accumulate_cross_term(
        self,
        module: torch.nn.Module,
        full_precision_input: torch.Tensor,
        quantized_input: torch.Tensor,
    ):
        if module in self._unpaired or (
            self._strengths.get(module, 0.0) == 0.0 and not self.report_errors
        ):
            return
        cross_term = _square_accumulator(self._cross_terms, module)
        increment = self._shared_product(
            "cross_term",
            (full_precision_input, quantized_input),
            cross_term.shape,
            lambda: accumulate_cross_term(
                full_precision_input, quantized_input, torch.zeros_like(cross_term)
            ),
        )
        cross_term += increment.to(cross_term.device)
        if self.report_errors:  # G = X X^T, normalised like H~ (in place)
            gram = _square_accumulator(self._full_precision_grams, module)
            accumulate_hessian(full_precision_input, module, gram, torch.zeros(()))

    def _mark_unpaired(self, module: torch.nn.Module):
        """The streams fed ``module`` different tokens: drop its input pairs."""
        self._unpaired.add(module)
        self._cross_terms.pop(module, None)
        self._full_precision_grams.pop(module, None)

    def _defer_later_groups(self, layer: torch.nn.Module):
        """The layer's order is known: its later groups wait for their replays."""
        if not self.true_sequential:
            return
        modules = [m for m in self._capture.layer_linears(layer) if _quantizes_weight(m)]
        groups = self._groups(layer, modules)
        for group in groups[1:]:
            self._capture.deferred.update(group)
            if self._needs_input_pairs(group):
                self._capture.cached_linears.update(group)

    def _calibration_output_unread(self, linears: list[torch.nn.Module]) -> bool:
        """Whether nothing but QEP's own hooks reads a layer's calibration pass
        past its first group, so later groups' Linears may skip computing there.

        Not when another modifier of the recipe calibrates in the same pass, nor
        when a quantized module lies outside every sequential target (a
        quantized ``lm_head`` reads the last layer's calibration output).
        """
        if not self.true_sequential:
            return False
        if any(module not in self._linear_layer for module in linears):
            return False
        recipe = getattr(active_session().lifecycle, "recipe", None)
        modifiers = getattr(recipe, "modifiers", None) or []
        return all(modifier is self for modifier in modifiers)

    def _shared_product(self, kind: str, inputs: tuple, shape: torch.Size, compute):
        """``compute()``, reused while the next module of ``kind`` is fed the very
        same tensors (not written in place since) into an accumulator of ``shape``."""
        signature = (tuple(tensor._version for tensor in inputs), shape)
        memo = self._shared_products.get(kind)
        if (
            memo is None
            or memo[1] != signature
            or any(kept is not tensor for kept, tensor in zip(memo[0], inputs))
        ):
            memo = self._shared_products[kind] = (inputs, signature, compute())
        return memo[2]

    def _clear_memos(self):
        self._shared_products.clear()

    # ----------------------------------------------------------- quantizing
    def _groups(
        self, layer: torch.nn.Module, calibrated: list[torch.nn.Module]
    ) -> list[list[torch.nn.Module]]:
        wanted = set(calibrated)
        groups = [
            [module for module in group if module in wanted]
            for group in self._capture.groups(layer)
        ]
        groups = self._merge_expert_groups([group for group in groups if group])
        grouped = {module for group in groups for module in group}
        rest = [module for module in calibrated if module not in grouped]
        return groups + ([rest] if rest else [])

    def _merge_expert_groups(
        self, groups: list[list[torch.nn.Module]]
    ) -> list[list[torch.nn.Module]]:
        """One group per expert role (all experts' up projections, all downs, ...).

        Experts run one after another, so their Linears fall into one group per
        expert and role, and each group would cost a replay. A group whose
        modules are, up to the expert index, all in one earlier group joins it:
        expert ``e``'s inputs depend only on its own earlier Linears and on what
        came before the experts, all of which that earlier group follows.
        """
        merged: list[list[torch.nn.Module]] = []
        role_group: dict[str, int] = {}
        for group in groups:
            roles = {_expert_role(self._module_names[module]) for module in group}
            targets = {role_group.get(role) for role in roles}
            if len(targets) == 1 and None not in targets:
                merged[targets.pop()].extend(group)
                continue
            for role in roles:
                role_group.setdefault(role, len(merged))
            merged.append(list(group))
        return merged

    def _needs_input_pairs(self, group: list[torch.nn.Module]) -> bool:
        """Whether ``group`` needs the full-precision stream (X beside X~)."""
        return self.report_errors or any(
            self._strengths.get(module, 0.0) > 0 for module in group
        )

    def _forget_statistics(self, module: torch.nn.Module):
        self._hessians.pop(module, None)
        self._num_samples.pop(module, None)
        self._cross_terms.pop(module, None)
        self._full_precision_grams.pop(module, None)
        self._unpaired.discard(module)
        self._token_counts.pop(module, None)

    def _correct_and_quantize(self, group: list[torch.nn.Module]):
        """Correct, observe and quantize ``group``."""
        with torch.no_grad(), disable_offloading():
            report = {}
            for module in group:
                if (statistics := self._report_statistics(module)) is not None:
                    report[module] = statistics
            for module in group:
                self._apply_correction(module)
            corrected = {module: module.weight.detach().clone() for module in report}
            observe(group, base_name="weight")
            self.sync_obs_act_stats(group)
            update_qparams(group, ACTIVATION_OBS, only_update_onload=not is_src())
            if self.base == "rtn":
                self._round_to_nearest(group)
            else:
                self.compress_module_list(group)
            for module, (weight, gram, cross_term, hessian) in report.items():
                errors = {
                    label: relative_output_error(
                        weight, candidate, gram, cross_term, hessian
                    )
                    for label, candidate in (
                        ("before", weight),
                        ("corrected", corrected[module]),
                        ("quantized", module.weight.detach()),
                    )
                }
                if self._strengths.get(module, 0.0) == 0.0:
                    errors["corrected"] = None
                name = self._module_names[module]
                self._error_report.append({"name": name, **errors})

    def _report_statistics(self, module: torch.nn.Module):
        """Original weight and normalised G, C, H~ for the error report."""
        gram = self._full_precision_grams.pop(module, None)
        if gram is None or module not in self._cross_terms:
            return None
        num_samples = self._num_samples[module]
        return (
            module.weight.detach().clone(),
            gram / num_samples,
            self._cross_terms[module] / num_samples,
            self._hessians[module] / num_samples,
        )

    def _apply_correction(self, module: torch.nn.Module):
        cross_term = self._cross_terms.pop(module, None)
        strength = self._strengths.get(module, 0.0)
        if module in self._unpaired:
            if strength > 0.0:
                self._unpaired_names.append(self._module_names[module])
            self._unpaired.discard(module)
            return
        if cross_term is None or strength == 0.0:
            return
        num_samples = self._num_samples[module]
        hessian = self._hessians[module] / num_samples
        try:
            weight, _ = corrected_weight(
                module.weight,
                cross_term / num_samples,
                hessian,
                propagation_strength=strength,
                correction_damping=self.correction_damping,
            )
        except CorrectionFailed as failure:
            name = self._module_names[module]
            logger.warning(f"QEP: {name} left uncorrected: {failure}")
            self._uncorrected.append(name)
            return
        update_offload_parameter(module, "weight", weight)

    def compress_module_list(self, module_list):
        """The GPTQ sweep on each module, with FOEM's term when ``beta > 0``."""
        sweep = quantize_weight
        if self.first_order_strength > 0:
            sweep = partial(
                quantize_weight_first_order,
                first_order_strength=self.first_order_strength,
                first_order_reach=self.first_order_reach,
            )
        for batch in assign_batches(
            module_list, self.batched_quantization, self.block_size
        ):
            quant_args = getattr_chain(batch[0], "quantization_scheme.weights")
            qparams = [module.weight_observer.get_qparams() for module in batch]
            names = [self._module_names[module] for module in batch]
            logger.info(f"QEP: quantizing {names}")
            with contextlib.ExitStack() as loggers:
                weights, hessians, scales, zero_points, global_scales = prepare_batch(
                    batch, qparams, self._hessians, self._num_samples
                )
                metric_loggers = [
                    loggers.enter_context(CompressionLogger(module)) for module in batch
                ]
                quantized, losses, fell_back = sweep(
                    weights=weights,
                    hessians=hessians,
                    scale=scales,
                    zero_point=zero_points,
                    global_scale=global_scales,
                    quant_args=quant_args,
                    blocksize=self.block_size,
                    percdamp=self.dampening_frac,
                )
                for index, metric_logger in enumerate(metric_loggers):
                    metric_logger.set_results(name="QEP", loss=losses[index].item())
                    if fell_back[index].item():
                        self._rtn_fallback_module_names.append(names[index])
            update_batch_qparams(
                batch, quantized, scales, zero_points, global_scales, quant_args
            )
            self._quantized.update(batch)
            self._num_compressed_modules += len(batch)

    def _quantize_uncalibrated(self, modules: list[torch.nn.Module]):
        """Round to nearest the modules that saw no token (e.g. unrouted experts).

        llm-compressor's GPTQ would divide an all-zero Hessian by zero samples;
        the observer's scales on the module's own weight are all there is.
        """
        if not modules:
            return
        with torch.no_grad(), disable_offloading():
            for module in modules:
                self._forget_statistics(module)
            observe(modules, base_name="weight")
            update_qparams(modules, ACTIVATION_OBS, only_update_onload=not is_src())
            self._round_to_nearest(modules)
        self._uncalibrated.extend(self._module_names[module] for module in modules)

    def _round_to_nearest(self, group: list[torch.nn.Module]):
        for module in group:
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
            update_offload_parameter(
                module, "weight_scale", qparams["scale"].to(module.weight.dtype)
            )
            update_offload_parameter(
                module,
                "weight_zero_point",
                qparams["zero_point"].to(quant_args.zp_dtype),
            )
            self._hessians.pop(module, None)
            self._num_samples.pop(module, None)
            self._num_compressed_modules += 1
            self._quantized.add(module)

    # ------------------------------------------------------------ checks
    def _check_weight_only_int(self):
        for module, name in self._module_names.items():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            if scheme.input_activations is not None or (
                scheme.output_activations is not None
            ):
                raise ValueError(
                    f"QEPModifier is weight-only: {name} has activation quantization "
                    "in its scheme; use a weight-only scheme (W4A16, W3A16, W2A16, "
                    "W4A16_ASYM or config_groups with only `weights`)"
                )
            weights = scheme.weights
            if weights is not None and weights.type != QuantizationType.INT:
                raise ValueError(
                    f"QEPModifier quantizes to integers only: {name} has weight type "
                    f"{weights.type!r}; allowed: 'int'"
                )

    def _check_group_sizes(self):
        for module, name in self._module_names.items():
            weights = getattr_chain(module, "quantization_scheme.weights", None)
            group_size = getattr(weights, "group_size", None)
            if weights is None or weights.strategy != "group" or not group_size:
                continue
            width = module.weight.shape[1]
            if width % group_size:
                allowed = [size for size in (32, 64, 128, 256) if width % size == 0]
                raise ValueError(
                    f"group_size {group_size} does not divide the input size {width} of "
                    f"{name}; group sizes that fit every such module must divide "
                    f"{width} (e.g. {allowed or 'none of 32/64/128/256'}), or use "
                    "strategy: channel, or add the module to `ignore`"
                )

    def _check_calibration_size(self, calibration):
        if calibration is None:
            return
        tokens = 0
        for batch in calibration:
            mask = batch.get("attention_mask")
            ids = batch.get("input_ids")
            if mask is not None:
                tokens += int(torch.as_tensor(mask).sum())
            elif ids is not None:
                tokens += torch.as_tensor(ids).numel()
        if tokens == 0:
            raise ValueError(
                "QEPModifier needs calibration data: the calibration set is empty"
            )
        widest = max(module.weight.shape[1] for module in self._module_names)
        if tokens < widest:
            logger.warning(
                f"QEP: the calibration set has {tokens} tokens, fewer than the widest "
                f"target input ({widest}): H~ is rank-deficient and the damping "
                "(dampening_frac, correction_damping) dominates; use more samples"
            )

    def _warn_unmatched_patterns(self):
        if "propagation_strength" not in self.model_fields_set or not isinstance(
            self.propagation_strength, Mapping
        ):
            return  # the default mapping is written for any model
        names = list(self._module_names.values())
        unmatched = [
            pattern
            for pattern in self.propagation_strength
            if pattern != DEFAULT_STRENGTH_KEY
            and not any(re.search(pattern, name) for name in names)
        ]
        if unmatched:
            logger.warning(
                "QEP: propagation_strength patterns match no target module: "
                + ", ".join(repr(pattern) for pattern in unmatched)
            )


class FOEMModifier(QEPModifier):
    """FOEM alone: the GPTQ sweep with the first-order term, no QEP correction.

    The same fields as :class:`QEPModifier`, with ``propagation_strength: 0``
    and ``first_order_strength: 0.2`` as defaults (best of 0.05 / 0.1 / 0.2 on
    SmolLM2 at W3, README; the paper uses 0.1). With no correction the
    full-precision stream is never computed.
    """

    propagation_strength: float | dict[str, float] = 0.0
    first_order_strength: float = 0.2


def _quantizes_weight(module: torch.nn.Module) -> bool:
    """A target whose weight this modifier quantizes (embeddings are left out)."""
    return getattr_chain(
        module, "quantization_scheme.weights", None
    ) is not None and not isinstance(module, torch.nn.Embedding)


_EXPERT_INDEX = re.compile(r"(experts?)\.\d+\.")


def _expert_role(name: str) -> str:
    """``...mlp.experts.7.down_proj`` -> ``...mlp.experts.*.down_proj``."""
    return _EXPERT_INDEX.sub(r"\1.*.", name)


def _square_accumulator(
    accumulators: dict[torch.nn.Module, torch.Tensor], module: torch.nn.Module
) -> torch.Tensor:
    """The module's float32 ``d_in x d_in`` accumulator, zeros on first use."""
    if module not in accumulators:
        width = module.weight.shape[1]
        accumulators[module] = torch.zeros(
            (width, width), dtype=torch.float32, device=get_execution_device(module)
        )
    return accumulators[module]
