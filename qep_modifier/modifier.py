"""QEPModifier: quantization error propagation on top of llm-compressor's GPTQ.

This file holds the recipe fields, their validation and the lifecycle. One
calibration run's state and its one-way flow (record -> plan -> run -> correct
-> quantize -> tune, per subgraph of the sequential pipeline) live in
:class:`~qep_modifier.calibrate.CalibrationRun`, created at
``on_calibration_start`` and dropped at ``on_finalize``: ``self._run`` is
``None`` outside calibration.

Every forward QEP runs itself runs with every other hook silenced, so another
modifier calibrating in the same pass sees each batch once.
"""

from __future__ import annotations

import copy
import difflib
import enum
import math
from collections.abc import Mapping
from typing import Literal

import torch
from compressed_tensors.utils import patch_attr
from pydantic import PrivateAttr, field_validator, model_serializer, model_validator

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin

from qep_modifier.block_tuning import DEFAULT_LEARNING_RATE
from qep_modifier.calibrate import (
    CalibrationRun,
    DecoderLayers,
    RunSummary,
    calibration_output_unread,
)
from qep_modifier.checks import (
    NonFiniteWeights,
    check_calibration_size,
    check_code_learning,
    check_end_to_end_model,
    check_finite_weights,
    check_modules,
    check_observer_name,
    check_scheme,
    check_sweep_on_observer_scales,
    check_targets_match,
)
from qep_modifier.distributed import check_distinct_shards
from qep_modifier.end_to_end import DEFAULT_END_TO_END_LEARNING_RATE
from qep_modifier.rotations import check_session_rotations
from qep_modifier.strength import (
    DEFAULT_PROPAGATION_STRENGTH,
    check_propagation_strength,
    warn_unmatched_patterns,
)
from qep_modifier.tracing import expose_local_mask_functions

__all__ = ["QEPModifier", "FOEMModifier", "NonFiniteWeights", "DEFAULT_PROPAGATION_STRENGTH"]

# the lifecycle's own fields (index, group, start, end, update, the *_ state
# flags, requires_calibration_data): the toolkit sets them, recipes do not, so
# the list of fields in error messages leaves them out
_LIFECYCLE_FIELDS = frozenset(Modifier.model_fields)

# what each float field allows besides being finite (said when it is not)
_FLOAT_RANGES = {
    "correction_damping": "> 0",
    "block_tuning_learning_rate": "> 0",
    "first_order_strength": ">= 0",
    "block_tuning_code_learning_rate": ">= 0",
    "end_to_end_learning_rate": "> 0",
    "dampening_frac": ">= 0",
}

# the whole-number fields: least value allowed, what the number counts
_WHOLE_NUMBERS = {
    "block_size": (1, "columns the GPTQ sweep updates at once; default 128"),
    "refit_scales": (0, "refits per module"),
    "block_tuning_epochs": (0, "passes over the calibration batches per layer"),
    "end_to_end_epochs": (0, "passes of the whole model over the calibration batches at the end"),
}


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
        the Linears just quantized and the layer's norm weights (and LayerNorm
        biases: every norm an output gain can stand for), so that the
        layer's output on the quantized stream matches the full-precision layer's
        output on the full-precision stream, per token relative to the token's
        size (:func:`~qep_modifier.block_tuning.token_relative_error`); about
        three forwards of the layer per batch and pass. 0: no tuning. Same
        checkpoint format; group or channel strategy. A layer whose loss on up to
        8 batches did not go down keeps its untuned scales and norms (the summary
        names it). Under torch.distributed the result is one process's on the
        ranks' shards in rank order (docs/distributed.md)
    :param block_tuning_learning_rate: Adam's learning rate for block tuning, > 0
        (scales are tuned as ``scale * exp(gain)``, norm weights through a gain
        on the norm's output)
    :param block_tuning_code_learning_rate: Adam's learning rate for the integer
        codes in block tuning, >= 0 (0: the codes are held). With a rate, each
        tuned Linear gets a latent float code per weight, started at the GPTQ
        sweep's code plus what its rounding threw away (within half a step), and
        rounded in the forward with the gradient passed straight through
        (:func:`~qep_modifier.block_tuning.rounded_codes`); the rate falls
        linearly to 0 over the layer's steps, and the final codes are the
        rounded latent ones. Needs ``block_tuning_epochs >= 1``, ``base: gptq``
        and ``group_scales: observer``
    :param end_to_end_epochs: after every layer is quantized (and tuned), this
        many passes of Adam steps (one per calibration batch) over the whole
        model: they hold every code and zero point and tune every quantized
        Linear's group scales (but the output embedding's) and every norm's
        weights, so that the model's next-token distribution matches the
        full-precision model's, per token
        (:func:`~qep_modifier.end_to_end.token_kl_divergence`; the
        full-precision model's inputs of the output embedding are recorded at
        calibration start, one forward per batch). Each step is one forward and
        backward of the whole model on one batch. Kept only if it lowers the
        mean KL divergence on up to 8 batches. 0: none. Same checkpoint format;
        group or channel strategy; the model needs an output embedding that is
        a Linear
    :param end_to_end_learning_rate: Adam's first learning rate for end-to-end
        tuning, > 0, falling linearly to 0 over its steps
    :param stream_offload_device: where the full-precision stream, the recorded
        layer calls and the kept activations wait; keep it equal to oneshot's
        ``sequential_offload_device``
    :param cache_full_precision_inputs: keep the full-precision inputs of a
        layer's corrected groups from its full-precision pass (one activation
        cache per group while the layer is calibrated) instead of recomputing
        them with each group's replay. Results are the same either way.
    :param resume_replays: each group's replay of the quantized stream resumes
        where the previous one stopped: submodules that finished there (q/k/v,
        then the attention block, its output given by o on o's kept input)
        return their kept outputs (up to about three activation caches while a
        layer is calibrated); and, where the layer is not block tuned, the
        pipeline's propagation pass resumes from the last replay (the attention
        block's output and down_proj's input kept: intermediate / hidden size
        more caches, 2.7 on SmolLM2), so it costs one product instead of all of
        the layer's (:mod:`qep_modifier.propagation`). Results are the same.
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
    block_tuning_learning_rate: float = DEFAULT_LEARNING_RATE
    block_tuning_code_learning_rate: float = 0.0
    end_to_end_epochs: int = 0
    end_to_end_learning_rate: float = DEFAULT_END_TO_END_LEARNING_RATE
    cache_full_precision_inputs: bool = True
    resume_replays: bool = True
    report_errors: bool = False


    _decoder: DecoderLayers | None = PrivateAttr(default=None)
    # end-to-end tuning: the output embedding and the calibration dataloader
    _end_to_end: tuple[torch.nn.Module, object] | None = PrivateAttr(default=None)
    # the state of the calibration run (None outside calibration), and what the
    # last finished run left
    _run: CalibrationRun | None = PrivateAttr(default=None)
    _summary: RunSummary = PrivateAttr(default_factory=RunSummary)

    @property
    def error_report(self) -> list[dict]:
        """Per module: ``name``, ``before``, ``corrected`` (None if not
        corrected) and ``quantized`` relative output errors (``report_errors``)."""
        return list(self._summary.error_report)

    @property
    def chosen_strengths(self) -> dict[str, float]:
        """``propagation_strength: auto``: the strength chosen per module name."""
        return dict(self._summary.chosen_strengths)

    @property
    def problems(self) -> dict[str, list[str]]:
        """Modules that did not get the full method, by reason (see ``on_finalize``)."""
        return {reason: list(names) for reason, names in self._summary.problems.items()}

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
        return check_propagation_strength(value)

    @field_validator(*(name for name in _FLOAT_RANGES if name != "dampening_frac"))
    @classmethod
    def _check_range(cls, value, info):
        allowed = _FLOAT_RANGES[info.field_name]
        if not (value > 0 if allowed == "> 0" else value >= 0):
            raise ValueError(f"{info.field_name} must be {allowed}, got {value}")
        return value

    @field_validator(*_WHOLE_NUMBERS, mode="before")
    @classmethod
    def _check_whole_number(cls, value, info):
        least, what = _WHOLE_NUMBERS[info.field_name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"{info.field_name} must be a whole number >= {least} ({what}), got {value!r}"
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
        to 8 bits with a known observer; what ``refit_scales``,
        ``block_tuning_epochs`` and ``block_tuning_code_learning_rate`` need."""
        if self.scheme is not None and self.config_groups is not None:
            raise ValueError(
                "scheme and config_groups are both set; give one: scheme (a preset such "
                "as W4A16) or config_groups (the scheme written out)"
            )
        if self.refit_scales:
            check_sweep_on_observer_scales(
                self.base,
                self.group_scales,
                "refit_scales refits the scales to the GPTQ sweep's codes",
                "refit_scales refits the observer's scales after the sweep",
            )
        check_code_learning(
            self.block_tuning_code_learning_rate, self.block_tuning_epochs, self.base, self.group_scales
        )
        # on copies: resolving writes actorder and observers into config_groups
        # (a shallow twin otherwise: private state may hold the model's modules)
        twin = self.model_copy(
            update={
                "config_groups": copy.deepcopy(self.config_groups),
                "scheme": copy.deepcopy(self.scheme),
            }
        )
        for group, scheme in twin.resolve_quantization_config().config_groups.items():
            where = f"scheme {self.scheme!r}" if self.scheme is not None else f"config_groups.{group}"
            check_scheme(
                where, scheme, type(self).__name__, self.refit_scales, self.block_tuning_epochs,
                self.end_to_end_epochs,
            )
            check_observer_name(where, scheme.weights.observer, self.weight_observer)
        return self

    # ------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._check_fields_together()  # again: fields may change after parsing
        check_session_rotations(state.model)  # before SpinQuantModifier fuses (calibration start)
        expose_local_mask_functions(state.model)  # before the pipeline traces it: a causal mask
        # the toolkit's own divisibility check lists every module; QEP's says
        # which widths do not fit and which group sizes would (it also catches
        # modules narrower than a group, which the toolkit lets through)
        with patch_attr(self, "bypass_divisibility_checks", True):
            super().on_initialize(state, **kwargs)
        named_modules = [(name, module) for module, name in self._module_names.items()]
        self.check_modules(named_modules, state.model)
        check_finite_weights(named_modules)
        check_distinct_shards(kwargs.get("calib_data"))
        check_calibration_size(
            kwargs.get("calib_data"),
            max((module.weight.shape[1] for module in self._module_names), default=0),
        )

        self._decoder = DecoderLayers.find(
            state.model, kwargs.get("sequential_targets"), self._module_names
        )
        self._end_to_end = None
        if self.end_to_end_epochs:
            self._end_to_end = (
                check_end_to_end_model(state.model, kwargs.get("calib_data")),
                kwargs.get("calib_data"),
            )
        if "propagation_strength" in self.model_fields_set:  # the default fits any model
            warn_unmatched_patterns(self.propagation_strength, self._module_names.values())
        return True

    def check_modules(self, named_modules, model: torch.nn.Module | None = None) -> None:
        """This recipe's model checks on the ``(name, module)`` pairs its targets
        matched in ``model``, quantization schemes attached: some module to
        quantize (:func:`~qep_modifier.checks.check_targets_match`), then
        :func:`~qep_modifier.checks.check_modules`."""
        named_modules = list(named_modules)
        check_targets_match(
            named_modules, self.resolved_targets, self.ignore, type(self).__name__, model
        )
        check_modules(
            named_modules,
            owner=type(self).__name__,
            refit_scales=self.refit_scales,
            block_tuning_epochs=self.block_tuning_epochs,
            end_to_end_epochs=self.end_to_end_epochs,
        )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        decoder = self._decoder
        self._run = run = CalibrationRun.start(
            self, decoder.layers, decoder.names, decoder.layer_of, self._module_names, fields
        )
        if self._end_to_end is not None:  # the full-precision model's outputs, first
            run.record_end_to_end_targets(state.model, *self._end_to_end)
        for layer in decoder.layers:
            self.register_hook(layer, run.calls.record, "forward_pre", with_kwargs=True)
        outside = [module for module in run.targets if module not in decoder.layer_of]
        for module in outside:
            self.register_hook(module, run.accumulate_outside, "forward_pre")
        if calibration_output_unread(self, outside):
            for layer in decoder.layers:
                run.skipped.install(layer)

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs
    ):
        try:
            self._run.calibrate_subgraph(modules)
        except BaseException:
            self._run.skipped.remove_all()  # leave no layer computing its input only
            self._run.propagated.remove_all()  # nor handing back outputs
            raise

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        if self._run is not None:
            self._run.skipped.remove_all()
            self._run.propagated.remove_all()
        super().on_calibration_end(state, event, **kwargs)
        if self._run is not None:
            self._run.calls.clear()
            if self._end_to_end is not None:
                self._run.tune_end_to_end(state.model, self._end_to_end[0])

    def on_finalize(self, state: State, **kwargs) -> bool:
        # every rank's report rows, problems and choices, then one summary (rank 0)
        if self._run is not None:
            self._summary = self._run.summarise()
        self._run = None
        return super().on_finalize(state, **kwargs)


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

