"""What the applications share: recipe in, calibration windows, ``oneshot``,
perplexity, the gap-recovered figure and the bar chart.

``qep-demo``, ``qep-oneshot``, ``qep-eval`` and ``benchmarks/run.py`` all run
text -> tokens -> windows -> ``oneshot`` -> perplexity; they do it through the
functions here, so every one of them samples, quantizes and scores the same way.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from qep_modifier.evaluation import (
    calibration_dataset,
    evaluation_windows,
    perplexity,
    tokenize_text,
)

__all__ = [
    "InputError",
    "bar_chart",
    "check_recipe_fits",
    "check_rotations_fit",
    "one_line_errors",
    "model_config",
    "quiet_loading",
    "quiet_logs",
    "say_device",
    "resolve_recipe",
    "save_checkpoint",
    "DTYPES",
    "PACKAGED_RECIPES",
    "calibration_windows",
    "gap_recovered",
    "load_causal_lm",
    "load_recipe",
    "quantize",
    "score",
    "scoring_windows",
    "GAP_RECOVERED",
]

#: The recipes shipped in the package (``recipes/`` in the repository points here).
PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"

#: How the tables explain their gap-recovered column.
GAP_RECOVERED = "gap recovered = (ppl_gptq - ppl) / (ppl_gptq - ppl_fp), GPTQ = stock GPTQModifier"


class InputError(ValueError):
    """Bad input to an application, said in one line (file or field, what is
    wrong, what is allowed); the command-line tools print it without a traceback."""


@contextlib.contextmanager
def one_line_errors(program: str):
    """Bad input (:class:`InputError`, a recipe field out of range) ends the
    program with one line, no traceback."""
    from pydantic import ValidationError

    try:
        yield
    except InputError as error:
        raise SystemExit(f"{program}: {error}") from None
    except ValidationError as error:
        message = str(error.errors()[0].get("msg", error)).removeprefix("Value error, ")
        raise SystemExit(f"{program}: {message}") from None


def resolve_recipe(value: str | Path) -> Path:
    """A recipe file: the path as given, else a packaged recipe of that name
    (``w3a16_qep_gptq`` or ``w3a16_qep_gptq.yaml``)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    packaged = PACKAGED_RECIPES / (path.name if path.suffix else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml")))
    raise InputError(f"recipe {value} does not exist; packaged recipes: {names}")


def load_recipe(path: Path, report: bool = False):
    """The recipe's modifiers, built here (not by ``oneshot``) so the caller holds
    them; :class:`InputError` naming the file (and line, column or field) when
    it cannot be read. With ``report``, a modifier with a ``report_errors``
    field (``QEPModifier``, ``FOEMModifier``) gets ``report_errors: true``
    unless the YAML sets the field itself; its ``error_report`` fills during
    calibration."""
    import yaml
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    import qep_modifier  # noqa: F401  (registers QEPModifier and FOEMModifier)

    path = resolve_recipe(path)
    text = path.read_text(encoding="utf-8")
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"recipe {path}{where}: not valid YAML: {problem}") from None
    if not isinstance(content, dict) or not any(str(key).endswith("_stage") for key in content):
        raise InputError(
            f"recipe {path}: no stage found; a recipe's top-level keys end in `_stage` "
            "and hold groups ending in `_modifiers` (see recipes/)"
        )
    try:
        recipe = Recipe.create_instance(str(path))
    except ValidationError as error:
        details = error.errors()[0]
        message = str(details.get("msg", error)).removeprefix("Value error, ")
        field = ".".join(str(part) for part in details.get("loc", ()) if part != "__root__")
        where = f" ({field})" if field and field not in message else ""
        raise InputError(f"recipe {path}{where}: {message}") from None
    except ValueError as error:
        raise InputError(f"recipe {path}: {str(error).splitlines()[0]}") from None
    if not recipe.modifiers:
        raise InputError(f"recipe {path}: no modifiers found under its stages")
    if report:
        for modifier in recipe.modifiers:
            fields = getattr(type(modifier), "model_fields", {})
            if "report_errors" in fields and "report_errors" not in modifier.model_fields_set:
                modifier.report_errors = True
    return recipe


def check_recipe_fits(config, recipe) -> None:
    """Refuse, before any weight is loaded, a recipe that cannot run on the model
    of ``config``: a rotation the model type does not support
    (:func:`check_rotations_fit`), QEP targets that match no module, a group size
    that does not divide a targeted module's input width (a meta-device copy of
    the model built from ``config`` gets the recipe's schemes)."""
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoModelForCausalLM

    from qep_modifier.modifier import QEPModifier

    check_rotations_fit(config, recipe)
    ours = [modifier for modifier in recipe.modifiers if isinstance(modifier, QEPModifier)]
    if not ours:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for modifier in ours:
        apply_quantization_config(skeleton, modifier.resolved_config)
        named = list(match_named_modules(skeleton, modifier.resolved_targets, modifier.ignore))
        try:
            modifier.check_targets_match(skeleton, named)
            modifier.check_group_sizes(named)
        except ValueError as error:
            raise InputError(str(error)) from None


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
        ("olmo", "olmo2", "opt", "gpt_neox", "cohere", "starcoder2", "phi", "glm"),
        "its blocks' norms and projections do not match the rotations' pre-norm "
        "Llama layout",
    ),
    **dict.fromkeys(
        ("qwen3_moe", "qwen2_moe", "mixtral"),
        "its experts' router is not rotated, so the rotated model routes tokens "
        "differently: it runs and changes the model's outputs",
    ),
}


def check_rotations_fit(config, recipe) -> None:
    """Refuse a ``SpinQuantModifier`` on a model type outside
    :data:`SPINQUANT_MODEL_TYPES` (unless the recipe gives its own ``mappings``
    or ``transform_config``), in one line naming the model type and the
    packaged recipe without rotation to use instead. (``QuIPModifier`` rotates
    each Linear on its own and ran unchanged on every family tried.)"""
    model_type = getattr(config, "model_type", None)
    for modifier in recipe.modifiers:
        name = type(modifier).__name__
        if name != "SpinQuantModifier" or model_type in SPINQUANT_MODEL_TYPES:
            continue
        if {"mappings", "transform_config"} & set(modifier.model_fields_set):
            continue  # the recipe says where its rotations go
        why = SPINQUANT_MISFITS.get(model_type, "not among the model types its rotations were checked on")
        raise InputError(
            f"{name} does not support model type {model_type}: {why} (its rotations are "
            f"checked on {', '.join(SPINQUANT_MODEL_TYPES)}); use "
            f"{_without_rotation(recipe)} instead"
        )


def _without_rotation(recipe) -> str:
    """The packaged QEP recipe without rotation at the recipe's weight bits, or
    the advice to drop the rotation."""
    for modifier in recipe.modifiers:
        config = getattr(modifier, "resolved_config", None)
        for scheme in getattr(config, "config_groups", {}).values():
            bits = getattr(scheme.weights, "num_bits", None)
            if (PACKAGED_RECIPES / f"w{bits}a16_qep_gptq.yaml").is_file():
                return f"the packaged recipe w{bits}a16_qep_gptq (no rotation)"
    return "the recipe without its SpinQuantModifier"


def calibration_windows(tokenizer, text: str | Path | torch.Tensor, num_samples: int, seq_len: int, seed: int = 0):
    """``num_samples`` windows of ``seq_len`` tokens drawn (``seed``) from ``text``
    (a file, a string, or token ids), as a ``datasets.Dataset``."""
    ids = _token_ids(tokenizer, text)
    try:
        return calibration_dataset(ids, num_samples, seq_len, seed)
    except ValueError as error:
        raise InputError(f"{_name(text)}: {error}") from None


def _token_ids(tokenizer, text: str | Path | torch.Tensor) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text
    if isinstance(text, Path) and not text.is_file():
        raise InputError(f"text file {text} does not exist")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() == 0:
        raise InputError(f"{_name(text)} is empty: it has no tokens")
    return ids


def _name(text) -> str:
    return f"text file {text}" if isinstance(text, Path) else "the text"


def scoring_windows(tokenizer, text: str | Path | torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``text`` for perplexity (the WikiText-2 protocol)."""
    ids = _token_ids(tokenizer, text)
    try:
        return evaluation_windows(ids, seq_len, max_windows)
    except ValueError as error:
        raise InputError(f"{_name(text)}: {error}") from None


def quantize(model, recipe, dataset, output_dir: Path | None = None, **oneshot_kwargs):
    """``oneshot`` on every sample of ``dataset``, in order; the quantized model.

    ``model``: a model folder or a loaded model (then pass ``processor=``).
    ``recipe``: a path, a ``Recipe`` or modifiers. ``output_dir``: also save the
    compressed checkpoint (and tokenizer) there."""
    from llmcompressor import oneshot

    import qep_modifier  # noqa: F401

    settings = dict(
        num_calibration_samples=len(dataset),
        max_seq_length=len(dataset[0]["input_ids"]),
        shuffle_calibration_samples=False,
    )
    settings.update(oneshot_kwargs)
    if output_dir is not None:
        settings["output_dir"] = str(output_dir)
    if isinstance(recipe, Path):
        recipe = str(recipe)
    if isinstance(model, Path):
        model = str(model)
    return oneshot(model=model, dataset=dataset, recipe=recipe, **settings)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A model folder (compressed checkpoints too) for evaluation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def score(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of ``model`` on ``windows`` (see :mod:`qep_modifier.evaluation`)."""
    return perplexity(model.eval(), windows, batch_size=batch_size, progress=True)


def gap_recovered(ppl: float, gptq_ppl: float | None, fp_ppl: float | None) -> float | None:
    """The share of GPTQ's perplexity gap to full precision a method closes,
    ``(ppl_gptq - ppl) / (ppl_gptq - ppl_fp)``; ``None`` where undefined."""
    if gptq_ppl is None or fp_ppl is None or not gptq_ppl - fp_ppl > 0:
        return None
    if not all(math.isfinite(value) for value in (ppl, gptq_ppl, fp_ppl)):
        return None
    return (gptq_ppl - ppl) / (gptq_ppl - fp_ppl)


def bar_chart(
    path: Path,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str | None = None,
    log: bool = False,
    reference: tuple[str, float] | None = None,
) -> bool:
    """Grouped bars (one group per category, one bar per series) to ``path``;
    ``False`` when matplotlib is not installed (``pip install -e ".[plot]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    count = max(1, len(series))
    width = 0.8 / count
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(categories) * count / 2 + 2), 3.8))
    for index, (label, values) in enumerate(series.items()):
        positions = [x + index * width for x in range(len(categories))]
        bars = axis.bar(positions, values, width, label=label)
        if count == 1:
            for bar, value in zip(bars, values):
                axis.annotate(
                    f"{value:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    if reference is not None:
        axis.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    axis.set_xticks(
        [x + (count - 1) * width / 2 for x in range(len(categories))],
        categories,
        rotation=20 if count == 1 else 0,
        ha="right" if count == 1 else "center",
        fontsize=8,
    )
    axis.set_ylabel("perplexity (lower is better)")
    if log:
        axis.set_yscale("log")
    if title:
        axis.set_title(title)
    if count > 1 or reference is not None:
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def model_config(model: str | Path | None):
    """A model folder's config, or the packaged SmolLM2's (read from its GGUF
    file when it is not converted yet: no weights are loaded)."""
    from transformers import AutoConfig

    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise InputError(f"model {model} is not a model folder (no config.json)")
        return AutoConfig.from_pretrained(model)
    from qep_modifier.default_model import default_model_config

    return default_model_config()


#: what users serve: ``--dtype`` choices of the tools that save checkpoints
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def save_checkpoint(model, tokenizer, output: Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Save ``model`` compressed (``pack-quantized``) in ``dtype`` (scales and the
    unquantized tensors; the packed integers do not change), with its tokenizer;
    every file readable by all (as the rest of a checkpoint is).

    Under torch.distributed every rank must call it: compressed-tensors compresses
    the model on all ranks together, then rank 0 alone writes the files."""
    import os

    import torch.distributed as dist

    output = Path(output)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(output, save_compressed=True)
    if dist.is_initialized() and dist.get_rank() != 0:
        return output
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    umask = os.umask(0)
    os.umask(umask)
    for path in output.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    return output


@contextlib.contextmanager
def quiet_loading():
    """No progress bars (compressed-tensors draws "Compressing model" bars while
    merely loading a checkpoint)."""
    import os

    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def quiet_logs() -> None:
    """For the command-line tools (not for users' own ``oneshot`` calls), called
    before anything else: drop the toolkit's repeated device warning, its
    "Loading recipe" line (a tool reads its recipe to check it, then oneshot reads it) and
    torch.fx's tracing notice; keep everything else. :func:`say_device` then
    says once which device calibrates."""
    import logging

    from loguru import logger

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

    from llmcompressor.logger import LoggerConfig, configure_logger, support_log_once

    def keep(record) -> bool:
        message = record["message"]
        if "No accelerator available" in message or message.startswith("Loading recipe from"):
            return False
        return support_log_once(record)

    # the toolkit's own setup (levels included), which importing the package for a
    # console script skipped (``qep_modifier/__init__.py``), then one filtered handler
    configure_logger(LoggerConfig())
    logger.remove()
    logger.add(sys.stderr, level="INFO", filter=keep)


def say_device(program: str) -> None:
    """One line: which device calibrates."""
    device = "the accelerator" if torch.accelerator.is_available() else "the CPU (no accelerator)"
    print(f"{program}: calibrating on {device}", flush=True)
