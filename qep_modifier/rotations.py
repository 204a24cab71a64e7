"""Which model types llm-compressor's ``SpinQuantModifier`` rotations fit (and our
exact value rotation, :mod:`qep_modifier.value_rotation`), and the
one-line refusal for the others: before any weight is loaded
(:func:`qep_modifier.workflow.check_rotations_fit`, ``qep-oneshot``), and through a
plain ``oneshot(model, recipe=...)`` from ``QEPModifier.on_initialize``
(:func:`check_session_rotations`). The toolkit initialises every modifier of a
recipe before it starts calibrating, and ``SpinQuantModifier`` only infers its
module names at ``on_initialize``; it fuses its rotations (where it fails on
Gemma, Phi-3, OLMo 2, GPT-NeoX, OPT) at calibration start, after QEP's
``on_initialize`` has run, whatever the two modifiers' order in the recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "SPINQUANT_MISFITS", "SPINQUANT_MODEL_TYPES", "VALUE_ROTATION_MODEL_TYPES", "check_session_rotations",
    "rotation_misfit", "value_rotation_misfit",
]

#: Model types on which llm-compressor 0.14.0.1's SpinQuant R1/R2 rotations were
#: checked to leave the model's function unchanged: tiny random models of each
#: type, biases and norm weights randomised, logits before and after the
#: rotations equal to 1e-7 relative (without the toolkit's embedding centering,
#: which is no rotation). Its rotations assume Llama's module names and pre-norm
#: RMSNorm blocks; on the other families tried they fail inside compressed-tensors
#: after the model has loaded, or run and change the model.
SPINQUANT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "helium")

#: Why, for the families tried that are not in :data:`SPINQUANT_MODEL_TYPES`.
SPINQUANT_MISFITS = {
    **dict.fromkeys(
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        "its scaled word embedding cannot take a rotation in compressed-tensors",
    ),
    "phi3": "its fused qkv_proj and gate_up_proj do not match the rotations' module names",
    **dict.fromkeys(
        ("olmo", "olmo2", "opt", "gpt_neox", "cohere", "starcoder2", "phi", "glm", "falcon"),
        "its blocks' norms and projections do not match the rotations' pre-norm "
        "Llama layout",
    ),
    **dict.fromkeys(
        ("qwen3_moe", "qwen2_moe", "mixtral"),
        "its experts' router is not rotated, so the rotated model routes tokens "
        "differently: it runs and changes the model's outputs",
    ),
}

_PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"

#: Model types whose attention layouts :func:`qep_modifier.value_rotation.value_layouts` knows, each checked
#: on a tiny random model (tests/unit/test_value_rotation.py: logits unchanged).
VALUE_ROTATION_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "granite", "gemma2", "gemma3_text",
    "phi3", "olmo2", "gpt_neox", "opt", "falcon",
)


def value_rotation_misfit(model_type: str | None) -> str | None:
    """One line saying why :class:`~qep_modifier.value_rotation.ValueRotationModifier` cannot rotate a model of
    ``model_type``; ``None`` when it can."""
    if model_type in VALUE_ROTATION_MODEL_TYPES:
        return None
    return (
        f"ValueRotationModifier does not know where model type {model_type} keeps its "
        f"attention values (it knows {', '.join(VALUE_ROTATION_MODEL_TYPES)}); use the "
        "recipe without its ValueRotationModifier instead"
    )


def rotation_misfit(model_type: str | None, modifiers: Iterable, placed_by_recipe) -> str | None:
    """The one-line refusal for the first ``SpinQuantModifier`` among ``modifiers``
    that would rotate a model of ``model_type`` outside :data:`SPINQUANT_MODEL_TYPES`
    by the toolkit's own module names (``placed_by_recipe(modifier)`` false), naming
    the model type, why, and the packaged recipe without rotation to use instead,
    or a ``ValueRotationModifier`` on a model type it does not know
    (:func:`value_rotation_misfit`); ``None`` when
    every rotation fits. (``QuIPModifier`` rotates each Linear on its
    own and ran unchanged on every family tried.)"""
    modifiers = list(modifiers)
    for modifier in modifiers:
        name = type(modifier).__name__
        if name == "ValueRotationModifier" and (problem := value_rotation_misfit(model_type)) is not None:
            return problem
        if name != "SpinQuantModifier" or model_type in SPINQUANT_MODEL_TYPES:
            continue
        if placed_by_recipe(modifier):
            continue
        why = SPINQUANT_MISFITS.get(model_type, "not among the model types its rotations were checked on")
        return (
            f"{name} does not support model type {model_type}: {why} (its rotations are "
            f"checked on {', '.join(SPINQUANT_MODEL_TYPES)}); use "
            f"{_without_rotation(modifiers, model_type)} instead"
        )
    return None


def check_session_rotations(model) -> None:
    """Raise :func:`rotation_misfit`'s line for the recipe of the active
    llm-compressor session on ``model`` (called from ``QEPModifier.on_initialize``,
    before any modifier starts calibrating). ``SpinQuantModifier.on_initialize``
    sets its ``transform_config`` and, from the model's class, its ``mappings``
    (a recipe's own ``mappings`` are overwritten there in llm-compressor 0.14.0.1);
    so the recipe placed the rotations itself exactly when a ``transform_config``
    is set and the ``mappings`` are not the inferred ones."""
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.transform.spinquant.mappings import infer_mapping_from_model

    recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = getattr(recipe, "modifiers", None) or []

    def placed_by_recipe(modifier) -> bool:
        if getattr(modifier, "transform_config", None) is None:
            return False  # not initialised yet (after QEP in the recipe), or nothing given
        mappings = getattr(modifier, "mappings", None)
        return mappings is None or mappings != infer_mapping_from_model(model)

    config = getattr(model, "config", None)
    problem = rotation_misfit(getattr(config, "model_type", None), modifiers, placed_by_recipe)
    if problem is not None:
        raise ValueError(problem)


def _without_rotation(modifiers, model_type: str | None) -> str:
    """The packaged recipe at the recipe's weight bits that runs on ``model_type``
    without SpinQuant: the exact value rotation where it knows the model type and a
    recipe exists at those bits, else the plain QEP recipe; or the advice to drop
    the rotation."""
    values_fit = value_rotation_misfit(model_type) is None
    for modifier in modifiers:
        config = getattr(modifier, "resolved_config", None)
        for scheme in getattr(config, "config_groups", {}).values():
            bits = getattr(scheme.weights, "num_bits", None)
            if values_fit and (_PACKAGED_RECIPES / f"w{bits}a16_values_qep.yaml").is_file():
                return f"the packaged recipe w{bits}a16_values_qep (an exact value rotation only)"
            if (_PACKAGED_RECIPES / f"w{bits}a16_qep_gptq.yaml").is_file():
                return f"the packaged recipe w{bits}a16_qep_gptq (no rotation)"
    return "the recipe without its SpinQuantModifier"
