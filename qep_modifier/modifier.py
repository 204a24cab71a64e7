"""QEPModifier: quantization error propagation on top of llm-compressor's GPTQ.

Data flows one way, per subgraph of llm-compressor's sequential pipeline:

1. **record** (calibration pass): a pre-hook keeps each batch's call of each
   decoder layer (:class:`~qep_modifier.capture.RecordedCalls`). When nothing
   else reads that pass, the layers compute only its first batch there.
2. **plan** (epoch end): one traced forward gives the layer's within-block
   groups (:func:`~qep_modifier.plan.plan_layer`).
3. **run**: a full-precision pass (original weights, on the full-precision
   stream kept from the previous layer) keeps the corrected Linears' inputs
   ``X`` and the next layer's full-precision input; then, group by group, a
   replay of the quantized stream up to the group (resuming from the previous
   replay) gives ``X~``; the statistics (:mod:`qep_modifier.statistics`) are
   summed over the batches.
4. **correct**: ``W* = W + a W C (H~ + l I)^-1`` (:mod:`qep_modifier.correction`).
5. **quantize**: the observer's scales on ``W*``, then the GPTQ sweep with
   ``H~`` (with FOEM's term when ``first_order_strength > 0``,
   :mod:`qep_modifier.gptq_sweep`) or round to nearest; with ``refit_scales``
   the scales are refitted to the sweep's codes
   (:func:`~qep_modifier.gptq_sweep.refit_group_scales`), sweeping again
   between refits.

Every forward QEP runs itself runs with every other hook silenced, so another
modifier calibrating in the same pass sees each batch once.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import enum
import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationType, fake_quantize
from compressed_tensors.utils import (
    get_execution_device,
    getattr_chain,
    match_named_modules,
    patch_attr,
    update_offload_parameter,
)
from loguru import logger
from pydantic import PrivateAttr, field_validator, model_serializer, model_validator
from tqdm import tqdm

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.gptq.helpers import (
    GPTQ_PRECISION,
    assign_batches,
    prepare_batch,
    update_batch_qparams,
)
from llmcompressor.modifiers.quantization.calibration import observe
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.utils.metric_logging import CompressionLogger
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from qep_modifier.block_tuning import (
    OffGrid,
    column_groups,
    dequantized_weight,
    gained,
    grid_codes,
    checked_batches,
    keeps_tuning,
    mean_loss,
    scales_with_weight,
    token_relative_error,
    tune,
)
from qep_modifier.capture import (
    LayerPass,
    LayerStreams,
    RecordedCalls,
    SkippedCalibration,
    first_tensor,
    split_hidden,
)
from qep_modifier.correction import (
    AUTO,
    DEFAULT_STRENGTH_KEY,
    choose_strength,
    CorrectionFailed,
    corrected_weight,
    relative_output_errors,
    resolve_propagation_strength,
)
from qep_modifier.distributed import (
    assign_owners,
    barrier,
    check_distinct_shards,
    gather,
    publish,
    rank,
    reduce_statistics,
    share_step,
    shared,
)
from qep_modifier.gptq_sweep import (
    quantize_weight_first_order,
    quantize_weight_group_scales,
    refit_group_scales,
)
from qep_modifier.plan import Group, LayerPlan, TraceCall, expert_role, plan_layer, plan_subgraph
from qep_modifier.statistics import LinearStatistics, accumulate_batch
from qep_modifier.workflow import InputError

__all__ = ["QEPModifier", "FOEMModifier", "NonFiniteWeights", "DEFAULT_PROPAGATION_STRENGTH"]


class NonFiniteWeights(InputError):
    """A targeted module of the input model holds ``nan`` or ``inf``."""

# The reference implementation corrects every Linear with strength 0.5 except
# the MLP down projection: its input is the widest in the block (the
# intermediate size), so its d_in x d_in solve is the most expensive and the
# least well conditioned, and correcting it did not pay off there.
DEFAULT_PROPAGATION_STRENGTH: dict[str, float] = {
    r"(^|\.)down_proj$": 0.0,
    DEFAULT_STRENGTH_KEY: 0.5,
}

# what can go wrong for a module, and what it means (one summary at the end)
_PROBLEMS = {
    "unpaired": "the full-precision and quantized streams sent them different tokens "
    "(mixture-of-experts routing), so they were quantized without correction; "
    "oneshot's moe_calibrate_all_experts=True (its default) feeds every expert every "
    "token and pairs them",
    "outside": "they lie outside the decoder layers, where there is no full-precision "
    "stream, so they were quantized without correction",
    "uncorrected": "the correction was skipped (H~ + l I stayed indefinite), so they "
    "were quantized from their original weights",
    "uncalibrated": "they saw no calibration token and were rounded to nearest from "
    "their own weights (no GPTQ, no correction)",
    "rtn_fallback": "GPTQ's Hessian inversion failed and they were rounded to nearest "
    "(raise dampening_frac or use more calibration samples)",
    "auto_fallback": "propagation_strength auto needs calibration batches on both sides of "
    "its split (at least two batches); they were corrected with 0.5",
    "tuning_fallback": "block tuning did not lower their output error (or left it not "
    "finite), so they kept their untuned scales and norm weights (see "
    "block_tuning_learning_rate)",
}


# the lifecycle's own fields (index, group, start, end, update, the *_ state
# flags, requires_calibration_data): the toolkit sets them, recipes do not, so
# the list of fields in error messages leaves them out
_LIFECYCLE_FIELDS = frozenset(Modifier.model_fields)

# block tuning: how many calibration batches (at most) measure whether it helped
_TUNING_CHECK_BATCHES = 8

# what each float field allows besides being finite (said when it is not)
_FLOAT_RANGES = {
    "correction_damping": "> 0",
    "block_tuning_learning_rate": "> 0",
    "first_order_strength": ">= 0",
    "dampening_frac": ">= 0",
}

# the integer widths QEP quantizes weights to (what vLLM's WNA16 kernels serve)
_WEIGHT_BITS = range(2, 9)


class QEPModifier(GPTQModifier):
    """GPTQ (or RTN) on weights corrected for the error of earlier layers.

    Sample yaml (``import qep_modifier`` registers the name)::

        quant_stage:
          quant_modifiers:
            QEPModifier:
              targets: [Linear]
              ignore: [lm_head]
              scheme: W4A16
              weight_observer: memoryless_mse
              propagation_strength: {"(^|\\\\.)down_proj$": 0.0, default: 0.5}

    Lifecycle:

    - ``on_initialize``: apply the quantization config, check the recipe, find
      the decoder layers (sequential targets) and each target Linear's layer
    - ``on_calibration_start``: a pre-hook on each layer records its calls; a
      pre-hook on each target outside the layers (``lm_head``) accumulates its
      Hessian; layers compute only their first batch in the calibration pass
      when nothing else reads it
    - ``on_sequential_epoch_end``: per layer of the subgraph: plan, full-precision
      pass, per group replay -> correct -> observe -> quantize (module docstring)
    - ``on_calibration_end``: remove hooks, freeze quantization
    - ``on_finalize``: one warning summarising modules that were not corrected,
      not calibrated or fell back to round-to-nearest

    Accepts every GPTQModifier field (``targets``, ``ignore``, ``scheme``,
    ``config_groups``, ``block_size``, ``dampening_frac``, ``actorder``), plus:

    :param propagation_strength: ``a`` in ``W* = W + a W C (H~ + l I)^-1``: a
        number in [0, 1] or ``auto``, or a mapping from module-name regex
        (``re.search``, first match wins) to one, with key ``default`` for the
        rest. The default corrects everything at 0.5 except ``mlp.down_proj``.
        ``auto`` chooses each module's strength from 0 / 0.25 / 0.5 / 0.75 / 1:
        the one whose correction, fitted on half the calibration batches, gives
        the smallest output error on the other half (closed form); the module is
        then corrected with it on all batches.
    :param correction_damping: ``l`` as a fraction of ``mean(diag H~)``, > 0
    :param base: ``gptq`` (the GPTQ sweep on ``W*`` with Hessian ``H~``) or
        ``rtn`` (round ``W*`` to the observer's grid)
    :param true_sequential: quantize a layer's Linears group by group
        (modules sharing an input, in execution order), each group calibrated
        on the quantized stream through the groups before it
    :param first_order_strength: FOEM's ``beta`` in the GPTQ sweep, >= 0
        (0 is the plain GPTQ sweep)
    :param first_order_reach: which columns FOEM's first-order pull reaches
        when a column is quantized: ``next`` (the next column in sweep order,
        as the authors' code does) or ``all`` (every remaining column); see
        :mod:`qep_modifier.gptq_sweep`
    :param group_scales: with the group strategy, where each group's scale comes
        from: ``observer`` (the weight observer on the whole corrected weight
        before the sweep, as GPTQModifier does) or ``sweep`` (the observer on
        the group's weights when the sweep reaches it, after the compensation of
        the groups before; groups are then visited by importance, the columns
        within each group too, which needs no ``g_idx`` to serve)
    :param refit_scales: how many times each module's scales are refitted to the
        integer codes of its sweep (0: never, as GPTQModifier). A refit holds the
        codes and zero points and solves, per output row, for the group scales
        that minimise the output error against the weight the sweep started from
        (:func:`~qep_modifier.gptq_sweep.refit_group_scales`); with 2 or more, the
        sweep runs again on the refitted grid before each further refit (one
        sweep more per refit). Group or channel strategy, ``base: gptq``,
        ``group_scales: observer``
    :param block_tuning_epochs: after a decoder layer's Linears are quantized,
        this many passes of Adam steps (one per calibration batch) over the layer:
        they hold every integer code and zero point and tune the group scales of
        the Linears just quantized and the layer's RMSNorm weights, so that the
        layer's output on the quantized stream matches the full-precision layer's
        output on the full-precision stream, per token relative to the token's
        size (:func:`~qep_modifier.block_tuning.token_relative_error`). 0: no
        tuning, as GPTQModifier. The checkpoint has the same format (scales and
        norm weights change). Each pass costs about three forwards of the layer
        per batch. Under torch.distributed the steps run in one order on every
        rank (rank 0's batches, then rank 1's, ...), each batch's gradients sent
        from the rank that holds it, so the result is one process's on the ranks'
        shards in rank order; group or channel strategy. A layer whose loss,
        measured on up to 8 batches before the first step and after the last,
        did not go down (or is not finite) keeps its untuned scales and norm
        weights (the summary at the end names it)
    :param block_tuning_learning_rate: Adam's learning rate for block tuning, > 0
        (scales are tuned as ``scale * exp(gain)``, norm weights through a gain
        on the norm's output)
    :param stream_offload_device: where the full-precision stream, the recorded
        layer calls and the kept activations wait; keep it equal to oneshot's
        ``sequential_offload_device``
    :param cache_full_precision_inputs: keep the full-precision inputs of a
        layer's corrected groups from its full-precision pass (one activation
        cache per group while the layer is calibrated) instead of recomputing
        them with each group's replay. Results are the same either way.
    :param resume_replays: each group's replay of the quantized stream resumes
        where the previous one stopped: submodules that finished there (q/k/v,
        then o too) return their kept outputs (up to about three activation
        caches while a layer is calibrated). Results are the same.
    :param report_errors: after calibration, ``error_report`` lists for every
        module the relative output error ``||W X - V X~|| / ||W X||`` of the
        original weight, the corrected weight and the quantized weight (costs
        one more d_in x d_in accumulator per module in flight)
    """

    propagation_strength: float | str | dict[str, float | str] = dict(
        DEFAULT_PROPAGATION_STRENGTH
    )
    correction_damping: float = 0.01
    base: Literal["gptq", "rtn"] = "gptq"
    true_sequential: bool = True
    first_order_strength: float = 0.0
    first_order_reach: Literal["next", "all"] = "next"
    stream_offload_device: str | None = "cpu"
    group_scales: Literal["observer", "sweep"] = "observer"
    refit_scales: int = 0
    block_tuning_epochs: int = 0
    block_tuning_learning_rate: float = 0.005
    cache_full_precision_inputs: bool = True
    resume_replays: bool = True
    report_errors: bool = False

    _layers: list[torch.nn.Module] = PrivateAttr(default_factory=list)
    _layer_names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _targets: list[torch.nn.Module] = PrivateAttr(default_factory=list)
    _layer_of: dict[torch.nn.Module, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _strengths: dict[torch.nn.Module, float | str] = PrivateAttr(default_factory=dict)
    # propagation_strength: auto: which local batches are held out, and what
    # was chosen per module name (on the rank that corrected it)
    _held_out: list[bool] | None = PrivateAttr(default=None)
    _chosen: dict[str, float] = PrivateAttr(default_factory=dict)
    _calls: RecordedCalls | None = PrivateAttr(default=None)
    _skipped: SkippedCalibration = PrivateAttr(default_factory=SkippedCalibration)
    _outside_statistics: dict[torch.nn.Module, LinearStatistics] = PrivateAttr(
        default_factory=dict
    )
    # the full-precision stream: each batch's input of the next layer
    _full_precision_stream: list[torch.Tensor] | None = PrivateAttr(default=None)
    _last_paired_layer: int = PrivateAttr(default=-1)
    # (batch 1 input of the last skipped layer): see _check_propagated_input
    _skipped_input: torch.Tensor | None = PrivateAttr(default=None)
    _quantized: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    _problems: dict[str, list[str]] = PrivateAttr(default_factory=dict)
    _tuned_layers: int = PrivateAttr(default=0)  # block tuning: layers tuned
    # report rows by module name (on the rank that quantized it), and the order
    # every rank quantized them in
    _report_rows: dict[str, dict] = PrivateAttr(default_factory=dict)
    _report_order: list[str] = PrivateAttr(default_factory=list)
    _error_report: list[dict] = PrivateAttr(default_factory=list)

    @property
    def error_report(self) -> list[dict]:
        """Per module: ``name``, ``before``, ``corrected`` (None if not
        corrected) and ``quantized`` relative output errors (``report_errors``)."""
        return list(self._error_report)

    @property
    def chosen_strengths(self) -> dict[str, float]:
        """``propagation_strength: auto``: the strength chosen per module name."""
        return dict(self._chosen)

    @property
    def problems(self) -> dict[str, list[str]]:
        """Modules that did not get the full method, by reason (see ``on_finalize``)."""
        return {reason: list(names) for reason, names in self._problems.items()}

    # ------------------------------------------------------------ validation
    @model_serializer(mode="wrap")
    def _plain_values(self, handler):
        """Enums (a resolved ``actorder``) dump as their values, so the
        ``recipe.yaml`` saved into a checkpoint reads back with ``yaml.safe_load``
        and ``Recipe.create_instance``."""
        return _plain(handler(self))

    @model_validator(mode="before")
    @classmethod
    def _check_field_names(cls, values):
        """A misspelled field gets its name, the closest field and the list."""
        if not isinstance(values, Mapping):
            return values
        known = set(cls.model_fields)
        for key in values:
            if key not in known:
                fields = cls.recipe_fields()
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"{cls.__name__} has no field {key!r}{hint}; its fields: "
                    + ", ".join(fields)
                )
        return values

    @classmethod
    def recipe_fields(cls) -> list[str]:
        """The fields a recipe sets: every declared field (GPTQModifier's and the
        quantization mixin's included) but the lifecycle's own."""
        return [name for name in cls.model_fields if name not in _LIFECYCLE_FIELDS]

    @field_validator("*")
    @classmethod
    def _check_finite(cls, value, info):
        """No float field takes ``inf`` or ``nan`` (YAML's ``.inf``, ``.nan``)."""
        if isinstance(value, float) and not math.isfinite(value):
            allowed = _FLOAT_RANGES.get(info.field_name)
            allowed = f" {allowed}" if allowed else ""
            raise ValueError(f"{info.field_name} must be a finite number{allowed}, got {value}")
        return value

    @field_validator("propagation_strength", mode="before")
    @classmethod
    def _check_propagation_strength(cls, value):
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for pattern, strength in items:
            where = "" if pattern is None else f"[{pattern!r}]"
            if strength == AUTO:
                continue
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise ValueError(
                    f"propagation_strength{where} must be a number in [0, 1] or "
                    f"'auto', got {strength!r}"
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

    @field_validator("correction_damping", "block_tuning_learning_rate")
    @classmethod
    def _check_positive(cls, value, info):
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @field_validator("first_order_strength")
    @classmethod
    def _check_first_order_strength(cls, value):
        if not value >= 0:
            raise ValueError(f"first_order_strength must be >= 0, got {value}")
        return value

    @field_validator("refit_scales", "block_tuning_epochs", mode="before")
    @classmethod
    def _check_counts(cls, value, info):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            what = {"refit_scales": "refits per module", "block_tuning_epochs": "passes over the calibration batches per layer"}
            raise ValueError(
                f"{info.field_name} must be a whole number >= 0 ({what[info.field_name]}), got {value!r}"
            )
        return value

    @field_validator("block_size", mode="before")
    @classmethod
    def _check_block_size(cls, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"block_size must be a whole number >= 1 (columns the GPTQ sweep updates "
                f"at once; default 128), got {value!r}"
            )
        return value

    @field_validator("dampening_frac")
    @classmethod
    def _check_dampening_frac(cls, value):
        # None is the toolkit's type, but the sweep multiplies by it
        if value is None or not value >= 0:
            raise ValueError(
                "dampening_frac must be a finite number >= 0 (a fraction of mean(diag H) "
                f"added to the Hessian's diagonal; default 0.01), got {value}"
            )
        return value

    @field_validator("stream_offload_device")
    @classmethod
    def _check_device(cls, value):
        if value is not None:
            try:
                torch.device(value)
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"stream_offload_device {value!r} is not a device ({error}); "
                    "e.g. cpu, cuda, cuda:0"
                ) from None
        return value

    @model_validator(mode="after")
    def _check_fields_together(self):
        """The rules between fields that need no model, when the recipe is parsed:
        one of ``scheme`` / ``config_groups``; every scheme weight-only int at 2
        to 8 bits with a known observer; what ``refit_scales`` and
        ``block_tuning_epochs`` need."""
        if self.scheme is not None and self.config_groups is not None:
            raise ValueError(
                "scheme and config_groups are both set; give one: scheme (a preset such "
                "as W4A16) or config_groups (the scheme written out)"
            )
        if self.refit_scales and self.base != "gptq":
            raise ValueError(
                "refit_scales refits the scales to the GPTQ sweep's codes: it needs "
                f"base: gptq, got base: {self.base}"
            )
        if self.refit_scales and self.group_scales != "observer":
            raise ValueError(
                "refit_scales refits the observer's scales after the sweep: it needs "
                f"group_scales: observer, got group_scales: {self.group_scales}"
            )
        # on copies: resolving writes actorder and observers into config_groups
        # (a shallow twin otherwise: private state may hold the model's modules)
        twin = self.model_copy(
            update={
                "config_groups": copy.deepcopy(self.config_groups),
                "scheme": copy.deepcopy(self.scheme),
            }
        )
        config = twin.resolve_quantization_config()
        for group, scheme in config.config_groups.items():
            where = f"scheme {self.scheme!r}" if self.scheme is not None else f"config_groups.{group}"
            self._check_scheme(where, scheme)
        return self

    def _check_scheme(self, where: str, scheme) -> None:
        """Raise one line when ``scheme`` is not what QEP quantizes with."""
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise ValueError(
                f"{type(self).__name__} is weight-only: {where} quantizes activations too; use a "
                "weight-only scheme (W4A16, W3A16, W2A16, W4A16_ASYM or "
                "config_groups with only `weights`)"
            )
        weights = scheme.weights
        if weights is None:
            raise ValueError(f"{type(self).__name__} quantizes weights: {where} has no `weights`")
        if weights.type != QuantizationType.INT:
            raise ValueError(
                f"{type(self).__name__} quantizes to integers only: {where} has weight type "
                f"{_plain(weights.type)!r}; allowed: 'int'"
            )
        if weights.num_bits not in _WEIGHT_BITS:
            raise ValueError(
                f"{where}: weights num_bits = {weights.num_bits} is outside 2-8 "
                f"({type(self).__name__} quantizes weights to 2- to 8-bit integers)"
            )
        self._check_observer(where, weights.observer)
        for field, needs in (
            ("refit_scales", "refit_scales needs the group or channel strategy"),
            ("block_tuning_epochs", "block_tuning_epochs tunes group or channel scales"),
        ):
            if getattr(self, field) and weights.strategy not in ("group", "channel"):
                raise ValueError(f"{needs}: {where} has strategy {_plain(weights.strategy)!r}")

    def _check_observer(self, where: str, name: str | None) -> None:
        from llmcompressor.observers import Observer

        if name is None:
            return
        try:
            Observer.get_value_from_registry(name)
        except KeyError:
            known = [known.replace("-", "_") for known in Observer.registered_names()]
            close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            field = "weight_observer" if self.weight_observer == name else f"{where} weights observer"
            raise ValueError(
                f"{field}: no observer named {name!r}{hint}; observers: {', '.join(known)}"
            ) from None

    # ------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._check_fields_together()  # again: fields may change after parsing
        # the toolkit's own divisibility check lists every module; QEP's says
        # which widths do not fit and which group sizes would (it also catches
        # modules narrower than a group, which the toolkit lets through)
        with patch_attr(self, "bypass_divisibility_checks", True):
            super().on_initialize(state, **kwargs)
        self.check_targets_match(
            state.model, [(name, module) for module, name in self._module_names.items()]
        )
        self._check_finite_weights()
        self.check_group_sizes(
            (name, module) for module, name in self._module_names.items()
        )
        check_distinct_shards(kwargs.get("calib_data"))
        self._check_calibration_size(kwargs.get("calib_data"))

        sequential_targets = infer_sequential_targets(
            state.model, kwargs.get("sequential_targets")
        )
        named_layers = list(match_named_modules(state.model, sequential_targets))
        self._layers = [layer for _, layer in named_layers]
        self._layer_names = {layer: name for name, layer in named_layers}
        if any(layer in self._module_names for layer in self._layers):
            raise ValueError(
                f"QEPModifier needs sequential targets that contain the Linears it "
                f"quantizes (decoder layers); sequential_targets={sequential_targets} "
                "matches target modules themselves"
            )
        self._layer_of = {
            module: layer
            for layer in self._layers
            for module in layer.modules()
            if module in self._module_names
        }
        self._strengths = {
            module: resolve_propagation_strength(name, self.propagation_strength)
            for module, name in self._module_names.items()
        }
        self._warn_unmatched_patterns()
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)
        self._targets = [module for module in self._module_names if _quantizes_weight(module)]
        if not self._targets:
            raise ValueError(
                "QEPModifier found no modules to quantize: check `targets`, "
                "`ignore` and the scheme in the recipe"
            )
        self._error_report, self._problems, self._quantized = [], {}, set()
        self._tuned_layers = 0
        self._report_rows, self._report_order = {}, []
        self._held_out, self._chosen = None, {}
        self._full_precision_stream, self._skipped_input = None, None
        paired_layers = [
            self._layers.index(self._layer_of[module])
            for module in self._targets
            if module in self._layer_of and self._needs_pairs(module)
        ]
        self._last_paired_layer = max(paired_layers, default=-1)

        self._calls = RecordedCalls(self.stream_offload_device)
        for layer in self._layers:
            self.register_hook(layer, self._calls.record, "forward_pre", with_kwargs=True)
        outside = [module for module in self._targets if module not in self._layer_of]
        for module in outside:
            self.register_hook(module, self._accumulate_outside, "forward_pre")
        if self._calibration_output_unread(outside):
            for layer in self._layers:
                self._skipped.install(layer)

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs
    ):
        try:
            self._calibrate_subgraph(modules)
        except BaseException:
            self._skipped.remove_all()  # leave no layer computing its input only
            raise

    def _calibrate_subgraph(self, modules: list[torch.nn.Module]) -> None:
        subgraph = plan_subgraph(modules, self._layers, self._targets, self._layer_of.get)
        skipped = [self._skipped.remove(layer) for layer in subgraph.layers]
        quantized_hidden = None  # layers after the first: their input, propagated here
        for position, layer in enumerate(subgraph.layers):
            if position == 0:
                self._check_propagated_input(layer)
            last = position == len(subgraph.layers) - 1
            quantized_hidden = self._calibrate_layer(
                layer, quantized_hidden, propagate=not last
            )
        if subgraph.layers:
            last_layer = subgraph.layers[-1]
            self._skipped_input = (
                split_hidden(*self._calls.fetch(last_layer, 1))[0]
                if skipped[-1] and self._calls.num_batches(last_layer) > 1
                else None
            )
            for layer in subgraph.layers:
                self._calls.drop(layer)
        outside = [module for module in subgraph.outside if module not in self._quantized]
        if outside:
            statistics = {
                module: self._outside_statistics.pop(module, None)
                or LinearStatistics.empty(module, get_execution_device(module))
                for module in outside
            }
            reduce_statistics(statistics, outside)
            if rank() == 0:
                for module in outside:
                    if self._corrects(module):
                        self._note("outside", module)
            self._quantize_group(outside, statistics)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._skipped.remove_all()
        super().on_calibration_end(state, event, **kwargs)
        if self._calls is not None:
            self._calls.clear()

    def on_finalize(self, state: State, **kwargs) -> bool:
        # every rank's report rows and problems, then one summary (rank 0)
        rows = {name: row for part in gather(self._report_rows) for name, row in part.items()}
        self._error_report = [rows[name] for name in self._report_order if name in rows]
        problems: dict[str, list[str]] = {}
        for part in gather(self._problems):
            for reason, names in part.items():
                problems.setdefault(reason, []).extend(n for n in names if n not in problems[reason])
        self._problems = problems
        self._chosen = {name: a for part in gather(self._chosen) for name, a in part.items()}
        if rank() == 0:
            self._warn_problems()
            self._warn_tuning_never_kept()
            self._log_chosen_strengths()
        self._calls, self._full_precision_stream, self._skipped_input = None, None, None
        self._outside_statistics, self._quantized = {}, set()
        return super().on_finalize(state, **kwargs)

    # ----------------------------------------------------------- one layer
    def _calibrate_layer(
        self,
        layer: torch.nn.Module,
        quantized_hidden: list[torch.Tensor] | None,
        propagate: bool,
    ) -> list[torch.Tensor] | None:
        """Plan, run, correct and quantize one layer; its quantized outputs when
        ``propagate`` (the next layer of the same subgraph needs them)."""
        num_batches = self._calls.num_batches(layer)
        if num_batches == 0:
            raise RuntimeError(f"QEP: {self._layer_names[layer]} was not called during calibration")
        linears = [module for module in self._targets if self._layer_of.get(module) is layer]
        todo = [module for module in linears if module not in self._quantized]
        calls = partial(self._recorded_calls, layer)
        if self._held_out is None and any(self._strengths.get(m) == AUTO for m in self._targets):
            self._held_out = self._split_batches(layer)
        with torch.no_grad(), disable_offloading():
            plan = self._plan_layer(layer, linears, todo, calls, quantized_hidden)
            streams = LayerStreams(
                self,
                layer,
                linears,
                calls,
                quantized_hidden=quantized_hidden,
                full_precision_hidden=self._full_precision_stream,
                plan=plan,
                final=[module for module in linears if module not in todo],
                stream_needed=self.block_tuning_epochs > 0
                or self._layers.index(layer) < self._last_paired_layer,
                cache_full_precision=self.cache_full_precision_inputs,
                resume=self.resume_replays,
                offload_device=self.stream_offload_device,
            )
            self._full_precision_stream = None  # the streams own it now
            progress = tqdm(
                total=len(plan.groups) * num_batches,
                desc=f"QEP {self._layer_names[layer]}",
                leave=False,
            )
            for group in plan.groups:
                statistics = self._empty_statistics(group)
                held_out = self._empty_statistics(group, held_out=True)
                for batch, (quantized, full_precision) in enumerate(streams.inputs(group)):
                    accumulate_batch(statistics, quantized, full_precision)
                    if held_out and self._held_out[batch]:
                        accumulate_batch(held_out, quantized, full_precision)
                    progress.update(1)
                streams.quantizing(group)  # before any rank's owner writes a weight
                reduce_statistics(statistics, group.modules)  # sums over ranks
                reduce_statistics(held_out, group.modules)
                self._quantize_group(list(group.modules), statistics, held_out)
            progress.close()
            self._full_precision_stream = streams.finish()
            if self.block_tuning_epochs and todo:
                self._tune_layer(layer, todo, streams.quantized_calls(), self._full_precision_stream)
            return streams.propagate() if propagate else None

    def _tune_layer(self, layer, linears, calls, targets) -> None:
        """Block tuning (``block_tuning_epochs``): Adam steps on ``linears``'
        group scales and the layer's RMSNorm weights, so the layer's output on
        each batch's quantized-stream call (``calls()``) matches ``targets``
        (the full-precision layer's outputs); then the tuned scales, weights and
        norm weights are written back (:mod:`qep_modifier.block_tuning`), unless
        tuning did not lower the layer's loss (:func:`keeps_tuning`): then the
        layer keeps what it had, and the summary says so."""
        grids = {}
        for module in linears:
            # copies (read before any rank writes: under torch.distributed the ranks
            # may share one CPU copy, and each rank writes the same tuned values into it)
            scale = module.weight_scale.detach().to(torch.float32, copy=True)
            zero_point = module.weight_zero_point.detach()
            groups = column_groups(module.in_features, scale, getattr(module, "weight_g_idx", None))
            try:
                codes = grid_codes(module.weight.detach(), scale, zero_point, groups)
            except OffGrid as off:
                raise RuntimeError(f"QEP block tuning: {self._module_names[module]}: {off}") from off
            gain = torch.zeros_like(scale, requires_grad=True)
            grids[module] = (codes, scale, zero_point, groups, gain)
        norms = {
            module: torch.ones_like(module.weight, dtype=torch.float32, requires_grad=True)
            for module in layer.modules()
            if type(module).__name__.endswith("RMSNorm") and scales_with_weight(module)
        }
        norm_weights = {norm: norm.weight.detach().to(torch.float32).clone() for norm in norms}  # copies too

        def tuned_weights(scales):
            return {
                module: dequantized_weight(codes, scales[module], zero_point, groups)
                for module, (codes, _, zero_point, groups, _) in grids.items()
            }

        def tuned_scales():
            return {module: scale * gain.exp() for module, (_, scale, _, _, gain) in grids.items()}

        # one step per calibration batch, rank 0's batches first, then rank 1's, ...:
        # the order of one process given the ranks' shards one after the other
        counts = gather(self._calls.num_batches(layer))
        step_owners = [owner for owner, count in enumerate(counts) for _ in range(count)]
        # this rank's batches among those that measure whether tuning helped
        first_step = sum(counts[: rank()])
        checked = [
            step - first_step
            for step in checked_batches(len(step_owners), _TUNING_CHECK_BATCHES)
            if step_owners[step] == rank()
        ]
        progress = tqdm(
            total=self.block_tuning_epochs * len(step_owners) + 2 * len(checked),
            desc=f"QEP tuning {self._layer_names[layer]}",
            leave=False,
        )

        def layer_loss(batch, args, kwargs, hidden):
            with contextlib.ExitStack() as stack:
                for norm, norm_gain in norms.items():
                    stack.enter_context(
                        patch_attr(norm, "forward", partial(gained, norm.forward, norm_gain))
                    )
                plain = stack.enter_context(
                    LayerPass(self, layer, (), weights=tuned_weights(tuned_scales()))
                )
                output = first_tensor(plain.run(batch, args, kwargs, hidden)[1])
            return token_relative_error(output, targets[batch].to(output.device))

        def batch_losses():
            mine = iter(calls())
            for owner in step_owners:
                progress.update(1)
                if owner != rank():
                    yield None  # another rank's batch: its gradients come from share_step
                    continue
                yield layer_loss(*next(mine))

        def mean_layer_loss() -> float:
            """The mean loss over the checked batches of every rank at the current
            parameters (a forward each, no step); the same on every rank."""
            with torch.no_grad():
                losses = []
                for position, call in enumerate(calls()):
                    if position in checked:
                        losses.append(layer_loss(*call).item())
                        progress.update(1)
            return mean_loss([value for part in gather(losses) for value in part])

        # Whether tuning helped: the mean loss at the parameters it ends with against
        # the mean loss before any step, on the same batches, each measured in a pass
        # of its own (a forward per batch, no gradient). The losses the tuning passes
        # see cannot stand in for either: each is measured before its own batch's
        # step, at parameters that move from batch to batch, so only the first batch
        # of the first pass sees the start, and with few batches the early steps
        # weigh on a pass's mean while the parameters at its end are better (tiny
        # Llama, 2 batches: 0.0016 before, 0.0017 during the pass, 0.0012 after).
        # A paired comparison on up to 8 batches: the two passes cost about a third
        # of a tuning epoch at 32 batches, all of one at 8.
        start_loss = mean_layer_loss()
        parameters = [gain for *_, gain in grids.values()] + list(norms.values())
        owners = itertools.cycle(step_owners)
        history = tune(
            parameters,
            batch_losses,
            self.block_tuning_epochs,
            self.block_tuning_learning_rate,
            share=lambda parameters, loss: share_step(parameters, loss, next(owners)),
        )
        finite = all(bool(torch.isfinite(parameter).all()) for parameter in parameters)
        final_loss = mean_layer_loss() if finite else math.nan
        progress.close()
        kept = bool(history) and keeps_tuning(start_loss, final_loss, finite)
        self._tuned_layers += 1
        if kept:
            with torch.no_grad():
                scales = tuned_scales()
                for module, weight in tuned_weights(scales).items():
                    update_offload_parameter(module, "weight", weight.to(module.weight.dtype))
                    update_offload_parameter(
                        module, "weight_scale", scales[module].to(module.weight_scale.dtype)
                    )
                for norm, norm_gain in norms.items():
                    update_offload_parameter(norm, "weight", (norm_weights[norm] * norm_gain).to(norm.weight.dtype))
        else:  # its scales and norm weights were never written: they stay
            self._note_name("tuning_fallback", self._layer_names[layer])
        barrier()  # every rank wrote the same values; none propagates before all have
        if history and rank() == 0:  # the same on every rank
            logger.info(
                f"QEP: {'tuned' if kept else 'kept the untuned'} {self._layer_names[layer]}: "
                f"mean relative output error per token {start_loss:.4g} -> {final_loss:.4g} "
                "(during each epoch: " + " -> ".join(f"{loss:.4g}" for loss in history) + ")"
            )

    def _recorded_calls(self, layer: torch.nn.Module):
        for batch in range(self._calls.num_batches(layer)):
            yield (batch, *self._calls.fetch(layer, batch))

    def _plan_layer(self, layer, linears, todo, calls, quantized_hidden) -> LayerPlan:
        """Trace the layer on its first batch and group ``todo`` from the trace."""
        if not todo:
            return LayerPlan(groups=(), call_order={})
        batch, args, kwargs = next(calls())
        hidden = None if quantized_hidden is None else quantized_hidden[batch]
        with LayerPass(self, layer, linears, capture=todo) as traced:
            traced.run(batch, args, kwargs, hidden)
        # every rank plans from rank 0's trace, in a form that crosses processes
        index, keys = {module: i for i, module in enumerate(linears)}, {}
        trace = shared(
            [(index[call.module], keys.setdefault(call.input_key, len(keys))) for call in traced.trace]
        )
        return plan_layer(
            [TraceCall(linears[i], key) for i, key in trace],
            todo,
            role=lambda module: expert_role(self._module_names[module]),
            paired=self._needs_pairs,
            true_sequential=self.true_sequential,
        )

    def _empty_statistics(
        self, group: Group, held_out: bool = False
    ) -> dict[torch.nn.Module, LinearStatistics]:
        """Zeros for ``group``: every module's statistics over all batches, or,
        with ``held_out``, those of the held-out batches of ``auto`` modules."""
        modules = [
            m for m in group.modules
            if not held_out or (group.paired and self._strengths.get(m) == AUTO)
        ]
        return {
            module: LinearStatistics.empty(
                module,
                get_execution_device(module),
                cross_term=group.paired and (self._corrects(module) or self.report_errors),
                full_precision_gram=group.paired and (self.report_errors or held_out),
            )
            for module in modules
        }

    def _split_batches(self, layer: torch.nn.Module) -> list[bool]:
        """Which local batches ``auto`` holds out: the batches ordered by a digest
        of their first layer's input, over every rank, and every other one held
        out (so the split is the same however the batches are spread)."""
        digests = []
        for batch in range(self._calls.num_batches(layer)):
            hidden, _, _ = split_hidden(*self._calls.fetch(layer, batch))
            data = hidden.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            digests.append(hashlib.sha256(data).hexdigest())
        everyone = sorted(
            (digest, owner, index)
            for owner, part in enumerate(gather(digests))
            for index, digest in enumerate(part)
        )
        held = {(owner, index) for position, (_, owner, index) in enumerate(everyone) if position % 2}
        return [(rank(), index) in held for index in range(len(digests))]

    def _check_propagated_input(self, layer: torch.nn.Module) -> None:
        """Refuse ``propagate_error=False``: the pipeline then feeds each layer the
        calibration pass's output, computed before quantization.

        Seen two ways: the quantized stream equals the full-precision one bit for
        bit although modules before were quantized (the first batch, which every
        layer computes for real), or a batch of a layer that computed only its
        first batch comes back unchanged as the next layer's input.
        """
        if self._calls.num_batches(layer) == 0:
            return
        hidden, _, _ = split_hidden(*self._calls.fetch(layer, 0))
        stream = self._full_precision_stream
        same_as_full_precision = (
            self._quantized
            and stream
            and stream[0].shape == hidden.shape
            and torch.equal(stream[0].to(hidden.device), hidden)
        )
        same_as_skipped = False
        if self._skipped_input is not None and self._calls.num_batches(layer) > 1:
            second, _, _ = split_hidden(*self._calls.fetch(layer, 1))
            same_as_skipped = second.shape == self._skipped_input.shape and torch.equal(
                second, self._skipped_input.to(second.device)
            )
        if same_as_full_precision or same_as_skipped:
            raise RuntimeError(
                "QEP needs oneshot's propagate_error=True (its default): with "
                "propagate_error=False each layer is fed the previous layer's output "
                "before quantization, so there is no quantized stream to correct for"
            )

    # ----------------------------------------------------------- quantizing
    def _quantize_group(
        self,
        modules: Sequence[torch.nn.Module],
        statistics: Mapping[torch.nn.Module, LinearStatistics],
        held_out: Mapping[torch.nn.Module, LinearStatistics] | None = None,
    ) -> None:
        """Correct, observe and quantize ``modules``; round to nearest those that
        saw no token. Under torch.distributed each unit (a GPTQ batch of
        same-shape modules as one process forms it, or a module without tokens)
        is done by one owner rank, then published to all."""
        modules = [m for m in modules if m not in self._quantized]
        fed = [m for m in modules if m in statistics and statistics[m].tokens > 0]
        self._report_order += [
            self._module_names[m] for m in fed if statistics[m].full_precision_gram is not None
        ]
        units = self._sweep_batches(fed) + [[m] for m in modules if m not in fed]
        owners = assign_owners(units)
        mine = [unit for unit, owner in zip(units, owners) if owner == rank()]
        self._round_to_nearest(
            [m for unit in mine for m in unit if m not in fed], reason="uncalibrated"
        )
        self._correct_and_quantize(
            [unit for unit in mine if unit[0] in fed], statistics, held_out or {}
        )
        publish(modules, {m: owner for unit, owner in zip(units, owners) for m in unit})
        self._quantized.update(modules)

    def _sweep_batches(self, modules: list[torch.nn.Module]) -> list[list[torch.nn.Module]]:
        """GPTQ's batches of same-shape modules, formed once (rank 0's, which may
        depend on its free accelerator memory) so every rank sweeps the same."""
        batches = assign_batches(modules, self.batched_quantization, self.block_size)
        index = {module: i for i, module in enumerate(modules)}
        shape = shared([[index[module] for module in batch] for batch in batches])
        return [[modules[i] for i in batch] for batch in shape]

    def _correct_and_quantize(
        self,
        batches: list[list[torch.nn.Module]],
        statistics: Mapping[torch.nn.Module, LinearStatistics],
        held_out: Mapping[torch.nn.Module, LinearStatistics],
    ) -> None:
        modules = [module for batch in batches for module in batch]
        if not modules:
            return
        with torch.no_grad(), disable_offloading():
            report = {}
            for module in modules:
                stats = statistics[module]
                if stats.full_precision_gram is not None:
                    report[module] = (module.weight.detach().clone(), *stats.normalised())
            for module in modules:
                self._apply_correction(module, statistics[module], held_out.get(module))
            corrected = {module: module.weight.detach().clone() for module in report}
            observe(modules, base_name="weight")  # weight-only: no activation observers
            if self.base == "rtn":
                self._round_to_nearest(modules)
            else:
                for batch in batches:
                    self._sweep(batch, statistics)
            for module, (weight, hessian, cross_term, gram) in report.items():
                candidates = [weight, corrected[module], module.weight.detach()]
                errors = dict(
                    zip(
                        ("before", "corrected", "quantized"),
                        relative_output_errors(weight, candidates, gram, cross_term, hessian),
                    )
                )
                if not self._corrects(module):
                    errors["corrected"] = None
                name = self._module_names[module]
                self._report_rows[name] = {"name": name, **errors}

    def _apply_correction(
        self,
        module: torch.nn.Module,
        stats: LinearStatistics,
        held_out: LinearStatistics | None = None,
    ) -> None:
        if not self._corrects(module):
            return
        if not stats.paired:
            self._note("unpaired", module)
            return
        if stats.cross_term is None:
            return
        strength = self._strengths[module]
        if strength == AUTO:
            strength = self._choose_strength(module, stats, held_out)
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
            logger.debug(f"QEP: {self._module_names[module]} left uncorrected: {failure}")
            self._note("uncorrected", module)
            return
        update_offload_parameter(module, "weight", weight)

    def _sweep(
        self,
        batch: list[torch.nn.Module],
        statistics: Mapping[torch.nn.Module, LinearStatistics],
    ) -> None:
        """The GPTQ sweep on one batch of same-shape modules, with FOEM's term
        when ``beta > 0``.

        Forked from the loop body of llm-compressor 0.14.0.1
        ``GPTQModifier.compress_module_list``. Differs in: the Hessians and sample
        counts come from ``statistics``
        (:class:`~qep_modifier.statistics.LinearStatistics`, never the
        modifier's private ``_hessians`` / ``_num_samples``); the batch is given
        (formed by :meth:`_sweep_batches`, the toolkit's ``assign_batches``);
        the sweep is :func:`~qep_modifier.gptq_sweep.quantize_weight_first_order`
        when ``first_order_strength > 0`` (with 0, the toolkit's
        ``quantize_weight`` as upstream); round-to-nearest fallbacks go to the
        summary of :meth:`on_finalize`; with ``group_scales: sweep`` the scales
        come from :func:`~qep_modifier.gptq_sweep.quantize_weight_group_scales`.
        """
        quant_args = getattr_chain(batch[0], "quantization_scheme.weights")
        if self.group_scales == "sweep" and quant_args.strategy == "group":
            return self._sweep_with_group_scales(batch, statistics, quant_args)
        sweep = quantize_weight
        if self.first_order_strength > 0:
            sweep = partial(
                quantize_weight_first_order,
                first_order_strength=self.first_order_strength,
                first_order_reach=self.first_order_reach,
            )
        qparams = [module.weight_observer.get_qparams() for module in batch]
        names = [self._module_names[module] for module in batch]
        logger.info(f"QEP: quantizing {names}")
        with contextlib.ExitStack() as loggers:
            weights, hessians, scales, zero_points, global_scales = prepare_batch(
                batch,
                qparams,
                {module: statistics[module].hessian for module in batch},
                {module: statistics[module].num_samples for module in batch},
            )
            metric_loggers = [
                loggers.enter_context(CompressionLogger(module)) for module in batch
            ]
            # the sweep overwrites its inputs; a refit needs them afterwards
            keep_inputs = bool(self.refit_scales)

            def run_sweep(scales):
                return sweep(
                    weights=weights.clone() if keep_inputs else weights,
                    hessians=hessians.clone() if keep_inputs else hessians,
                    scale=scales,
                    zero_point=zero_points,
                    global_scale=global_scales,
                    quant_args=quant_args,
                    blocksize=self.block_size,
                    percdamp=self.dampening_frac,
                )

            quantized, losses, fell_back = run_sweep(scales)
            if self.refit_scales:
                quantized, scales = self._refit_scales(
                    batch, weights, hessians, quantized, scales, run_sweep
                )
            self._record_sweep(batch, metric_loggers, losses, fell_back)
        update_batch_qparams(
            batch, quantized, scales, zero_points, global_scales, quant_args
        )

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
                    f"QEP: {self._module_names[module]} scale refit {round_ + 1}: output "
                    f"error {before[index].item():.4g} -> {after[index].item():.4g}"
                )
        return quantized, scales

    def _record_sweep(self, batch, metric_loggers, losses, fell_back) -> None:
        """Each module's GPTQ loss to its metric logger; RTN fallbacks to the summary."""
        for index, metric_logger in enumerate(metric_loggers):
            metric_logger.set_results(name="QEP", loss=losses[index].item())
            if fell_back[index].item():
                self._note("rtn_fallback", batch[index])

    def _sweep_with_group_scales(self, batch, statistics, quant_args) -> None:
        """``group_scales: sweep``: each group's scale chosen by the module's
        observer when the sweep reaches the group."""

        def group_qparams(item: int, weights: torch.Tensor):
            observer = batch[item].weight_observer
            observer(weights)
            qparams = observer.get_qparams()
            return qparams["scale"], qparams["zero_point"]

        names = [self._module_names[module] for module in batch]
        logger.info(f"QEP: quantizing {names} (group scales from the sweep)")
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
                first_order_strength=self.first_order_strength,
                first_order_reach=self.first_order_reach,
            )
            self._record_sweep(batch, metric_loggers, losses, fell_back)
        update_batch_qparams(batch, quantized, scales, zero_points, None, quant_args)

    def _round_to_nearest(self, modules: list[torch.nn.Module], reason: str | None = None):
        """Round ``modules`` to their observer's grid (``base: rtn``; with a
        ``reason``, modules without statistics: their observer is run here)."""
        if not modules:
            return
        with torch.no_grad(), disable_offloading():
            if reason is not None:
                observe(modules, base_name="weight")
            for module in modules:
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
                if reason is not None:
                    self._note(reason, module)

    def _choose_strength(
        self, module: torch.nn.Module, stats: LinearStatistics, held_out: LinearStatistics | None
    ) -> float:
        """``auto``: the strength whose correction fitted on the other batches
        does best on the held-out ones (0.5, the default, without two sides)."""
        name = self._module_names[module]
        two_sides = held_out is not None and held_out.paired and held_out.num_samples.item() > 0
        fit = stats.minus(held_out) if two_sides else None
        if fit is None or fit.num_samples.item() == 0:
            self._note("auto_fallback", module)
            self._chosen[name] = float(DEFAULT_PROPAGATION_STRENGTH[DEFAULT_STRENGTH_KEY])
            return self._chosen[name]
        fit_hessian, fit_cross, _ = fit.normalised()
        held_hessian, held_cross, held_gram = held_out.normalised()
        self._chosen[name], _ = choose_strength(
            module.weight.detach(),
            (fit_cross, fit_hessian),
            (held_gram, held_cross, held_hessian),
            self.correction_damping,
        )
        return self._chosen[name]

    def _log_chosen_strengths(self) -> None:
        """``auto``: the chosen strengths, averaged per module role."""
        if not self._chosen:
            return
        roles: dict[str, list[float]] = {}
        for name, strength in self._chosen.items():
            role = expert_role(re.sub(r"\.\d+\.", ".*.", name, count=1))
            roles.setdefault(role, []).append(strength)
        shown = ", ".join(
            f"{role}: {sum(values) / len(values):.2f} ({len(values)})"
            for role, values in roles.items()
        )
        logger.info(f"QEP: propagation_strength auto chose, on average per role: {shown}")

    # ----------------------------------------------------------------- hooks
    def _accumulate_outside(self, module: torch.nn.Module, args: tuple) -> None:
        """Calibration-pass pre-hook of a target outside the layers (``lm_head``)."""
        if module not in self._outside_statistics:
            self._outside_statistics[module] = LinearStatistics.empty(
                module, get_execution_device(module)
            )
        accumulate_batch({module: self._outside_statistics[module]}, {module: [args[0]]})

    # --------------------------------------------------------------- helpers
    def _corrects(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is corrected at all (a strength above 0, or auto)."""
        strength = self._strengths.get(module, 0.0)
        return strength == AUTO or strength > 0.0

    def _needs_pairs(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` needs the full-precision stream beside ``X~``."""
        return self.report_errors or self._corrects(module)

    def _note(self, reason: str, module: torch.nn.Module) -> None:
        self._note_name(reason, self._module_names[module])

    def _note_name(self, reason: str, name: str) -> None:
        names = self._problems.setdefault(reason, [])
        if name not in names:
            names.append(name)

    def _warn_tuning_never_kept(self) -> None:
        """A learning rate with which no tuned layer got better: one warning."""
        fell_back = len(self._problems.get("tuning_fallback", ()))
        if self._tuned_layers and fell_back >= self._tuned_layers:
            rate = self.block_tuning_learning_rate
            default = type(self).model_fields["block_tuning_learning_rate"].default
            advice = (
                f"is likely too large (the default is {default})"
                if rate > default
                else f"did not help here (the default is {default}; block_tuning_epochs: 0 "
                "turns tuning off)"
            )
            logger.warning(
                f"QEP: block tuning lowered the output error of none of the "
                f"{self._tuned_layers} tuned layer(s), so all kept their untuned scales and "
                f"norm weights: block_tuning_learning_rate: {rate} {advice}"
            )

    def _warn_problems(self) -> None:
        """One warning: which modules did not get the full method, and why."""
        if not self._problems:
            return
        lines = []
        for reason, names in self._problems.items():
            shown = ", ".join(names[:10])
            if len(names) > 10:
                shown += f" and {len(names) - 10} more (all at DEBUG level)"
                logger.debug(f"QEP: {reason}: " + ", ".join(names))
            lines.append(f"- {len(names)} module(s): {_PROBLEMS[reason]}: {shown}")
        logger.warning("QEP: not every module got the full method:\n" + "\n".join(lines))

    def _calibration_output_unread(self, outside: list[torch.nn.Module]) -> bool:
        """Whether nothing but QEP reads the pipeline's calibration pass, so that
        the layers may compute only its first batch (QEP records the calls and
        runs the layers itself; the pipeline throws that pass's output away).

        Not when another modifier of the recipe calibrates (modifiers that need no
        calibration data, such as SpinQuant's fused rotations, read nothing), when
        a quantized module lies outside every layer (a quantized ``lm_head``
        reads the last layer's calibration output), or with a KV-cache scheme.
        """
        if outside or getattr(self, "kv_cache_scheme", None) is not None:
            return False
        recipe = getattr(active_session().lifecycle, "recipe", None)
        modifiers = getattr(recipe, "modifiers", None) or []
        return all(
            modifier is self or not getattr(modifier, "requires_calibration_data", True)
            for modifier in modifiers
        )

    # ------------------------------------------------------------ checks
    def check_targets_match(self, model: torch.nn.Module, named_modules) -> None:
        """Raise one line naming ``targets`` and ``ignore`` when the ``(name,
        module)`` pairs they matched in ``model`` (the real model, or a
        meta-device copy before any load) hold no weight to quantize."""
        if any(_quantizes_weight(module) for _, module in named_modules):
            return
        example = next(
            (name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)),
            None,
        )
        seen = f"; its Linears are named like {example}" if example else ""
        raise InputError(
            f"{type(self).__name__}: targets {sorted(self.resolved_targets)} with ignore "
            f"{list(self.ignore)} match no module of the model with a weight to quantize"
            f"{seen}; targets take class names (Linear) or re: patterns of module names"
        )

    def _check_finite_weights(self) -> None:
        """Raise one line naming the first targeted module with a ``nan`` or
        ``inf`` in its weight or bias (scales, corrections and the error report
        would all be ``nan`` after it)."""
        for module, name in self._module_names.items():
            for kind in ("weight", "bias"):  # not the (still empty) quantization parameters
                parameter = getattr(module, kind, None)
                if not isinstance(parameter, torch.Tensor) or not parameter.is_floating_point():
                    continue
                count = int((~torch.isfinite(parameter.detach())).sum())
                if count:
                    raise NonFiniteWeights(
                        f"module {name} has {count} non-finite {kind} value"
                        f"{'s' if count > 1 else ''} (nan/inf); fix the model before quantizing"
                    )

    def check_group_sizes(self, named_modules) -> None:
        """Raise one line naming the group sizes and input widths that do not fit
        (and what would), for ``(name, module)`` pairs whose quantization scheme
        is attached: the real model, or a meta-device copy before any load."""
        misfits: dict[tuple[int, int], list[str]] = {}
        widths = set()
        for name, module in named_modules:
            weights = getattr_chain(module, "quantization_scheme.weights", None)
            group_size = getattr(weights, "group_size", None)
            if weights is None or weights.strategy != "group" or not group_size:
                continue
            width = module.weight.shape[1]
            widths.add(width)
            if width % group_size:
                misfits.setdefault((group_size, width), []).append(name)
        if not misfits:
            return
        described = "; ".join(
            f"group_size {group_size} does not divide the input width {width} of "
            f"{len(names)} module(s), e.g. {names[0]}"
            for (group_size, width), names in misfits.items()
        )
        fitting = [size for size in (32, 64, 128, 256) if all(w % size == 0 for w in widths)]
        raise ValueError(
            f"{type(self).__name__}: {described}; group sizes that fit every targeted "
            f"module: {', '.join(map(str, fitting)) or 'none of 32/64/128/256'}; or use "
            "strategy: channel, or add the modules to `ignore`"
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
        per_rank = gather(tokens)  # every rank decides on the same numbers
        if 0 in per_rank:
            where = "" if len(per_rank) == 1 else f" on rank {per_rank.index(0)}"
            raise ValueError(
                f"QEPModifier needs calibration data: the calibration set is empty{where}"
            )
        tokens = sum(per_rank)
        widest = max(module.weight.shape[1] for module in self._module_names)
        if tokens < widest and rank() == 0:
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

    propagation_strength: float | str | dict[str, float | str] = 0.0
    first_order_strength: float = 0.2


def _plain(value):
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _quantizes_weight(module: torch.nn.Module) -> bool:
    """A target whose weight this modifier quantizes (embeddings are left out)."""
    return getattr_chain(
        module, "quantization_scheme.weights", None
    ) is not None and not isinstance(module, torch.nn.Embedding)
