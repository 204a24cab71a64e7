"""What the applications share: recipe in, calibration windows, ``oneshot``,
perplexity, the gap-recovered figure and the bar chart.

``qep-demo``, ``qep-oneshot``, ``qep-eval`` and ``benchmarks/run.py`` all run
text -> tokens -> windows -> ``oneshot`` -> perplexity; they do it through the
functions here, so every one of them samples, quantizes and scores the same way.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import stat
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
from qep_modifier.rotations import SPINQUANT_MISFITS, SPINQUANT_MODEL_TYPES, rotation_misfit  # noqa: F401

__all__ = [
    "InputError",
    "bar_chart",
    "check_output",
    "check_recipe_fits",
    "check_rotations_fit",
    "first_non_finite",
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
    "check_calibration_size",
    "check_seq_len",
    "load_tokenizer",
    "read_text_file",
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
    """Bad input (:class:`InputError`, a recipe field out of range, a model with
    non-finite weights) ends the program with one line, no traceback."""
    from pydantic import ValidationError

    from qep_modifier.checks import NonFiniteWeights

    try:
        yield
    except (InputError, NonFiniteWeights) as error:
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
    (:func:`check_rotations_fit`), then QEP's model checks on a meta-device copy
    of the model built from ``config`` with the recipe's schemes
    (``QEPModifier.check_modules``: targets that match no module, weight-only
    int, refit and tuning strategies, group sizes against input widths)."""
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
            modifier.check_modules(named, skeleton)
        except ValueError as error:
            raise InputError(str(error)) from None


def check_rotations_fit(config, recipe) -> None:
    """Refuse a ``SpinQuantModifier`` on a model type outside
    :data:`~qep_modifier.rotations.SPINQUANT_MODEL_TYPES` (unless the recipe gives
    its own ``transform_config``), in one line naming the model type and the
    packaged recipe without rotation to use instead
    (:func:`~qep_modifier.rotations.rotation_misfit`). A recipe's own ``mappings``
    do not count: llm-compressor 0.14.0.1's ``SpinQuantModifier.on_initialize``
    replaces them with the ones it infers from the model's class."""
    problem = rotation_misfit(
        getattr(config, "model_type", None),
        recipe.modifiers,
        lambda modifier: "transform_config" in modifier.model_fields_set,
    )
    if problem is not None:
        raise InputError(problem)


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
    ids = tokenize_text(tokenizer, read_text_file(text) if isinstance(text, Path) else text)
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


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file; :class:`InputError` for a missing file, a folder,
    a binary file (a NUL byte), bytes that are not UTF-8 (with their offset), or
    an empty file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"text file {path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise InputError(f"text file {path} does not exist")
    data = path.read_bytes()
    if not data:
        raise InputError(f"text file {path} is empty")
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(
            f"text file {path} is binary (a NUL byte at offset {nul}), not UTF-8 text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"text file {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
            f"{error.start} cannot be decoded ({error.reason})"
        ) from None


#: files of which a model folder's tokenizer is made (any one of them, with what it names)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder`` (a model folder, or a tokenizer's own);
    :class:`InputError` naming the folder when it has none or it cannot be read."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "model's tokenizer into it (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the tokenizer in {folder} cannot be loaded: {first}") from None


#: config fields that hold a model's number of positions, by model family
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: config fields that hold a model's hidden width
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")


def _text_config(config):
    """The language model's part of ``config`` (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _config_int(config, fields: Sequence[str]) -> tuple[str, int] | None:
    config = _text_config(config)
    for field in fields:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return field, value
    return None


def check_seq_len(config, seq_len: int, model: str | Path | None) -> None:
    """Refuse windows longer than the positions the model has (its config's
    ``max_position_embeddings`` or its family's name for it); nothing when the
    config names none."""
    positions = _config_int(config, POSITION_FIELDS)
    if positions is not None and seq_len > positions[1]:
        field, value = positions
        name = model if model is not None else "the packaged SmolLM2"
        raise InputError(
            f"--seq-len {seq_len} is above model {name}'s {field} {value}: windows longer "
            f"than the model's positions; use --seq-len {value} or less"
        )


def available_memory() -> int | None:
    """Bytes of memory available to this process now (None: unknown)."""
    import os

    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: float32 copies of every calibration token's hidden state that calibration keeps
#: at once (the layer's inputs on both streams and its outputs): a lower bound
ACTIVATION_COPIES = 3


def check_calibration_size(config, num_samples: int, seq_len: int, available: int | None = None) -> None:
    """Refuse a calibration set whose activations alone cannot fit in memory:
    ``num_samples x seq_len x hidden x 4 bytes x ACTIVATION_COPIES`` against the
    memory ``available`` (measured when not given)."""
    hidden = _config_int(config, HIDDEN_FIELDS)
    available = available_memory() if available is None else available
    if hidden is None or available is None:
        return
    per_window = seq_len * hidden[1] * 4 * ACTIVATION_COPIES
    need = num_samples * per_window
    if need > available:
        raise InputError(
            f"--num-samples {num_samples} x --seq-len {seq_len}: calibration keeps about "
            f"{need / 2**30:.1f} GiB of activations ({num_samples} x {seq_len} tokens x "
            f"{hidden[0]} {hidden[1]} x 4 bytes x {ACTIVATION_COPIES}), more than the "
            f"{available / 2**30:.1f} GiB of memory available; at most about "
            f"{available // per_window} windows of {seq_len} tokens fit"
        )


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


def score(model, windows: torch.Tensor, batch_size: int = 1, check_finite: bool = False) -> float:
    """Perplexity of ``model`` on ``windows`` (see :mod:`qep_modifier.evaluation`;
    ``check_finite``: raise :class:`~qep_modifier.evaluation.NonFiniteLogits` at
    the first non-finite logits)."""
    return perplexity(model.eval(), windows, batch_size=batch_size, progress=True, check_finite=check_finite)


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


def check_output(output: str | Path, overwrite: bool = False, sources: Sequence[str | Path] = ()) -> Path:
    """Where a checkpoint may be saved: ``output`` as an absolute path (the links
    of its parent resolved), else :class:`InputError`. Refused: a model folder of
    ``sources`` that is ``output``, lies under it or holds it (even with
    ``overwrite``: a source is never replaced); a link, a file; a folder that
    holds anything, unless ``overwrite`` and it holds a model (``config.json``),
    which the save then replaces whole; a parent that is a file or that this
    process may not write. Cheap: the tools call it before loading a model,
    :func:`save_checkpoint` again before writing."""
    given = output
    absolute = Path(os.path.abspath(Path(output).expanduser()))
    if not absolute.name:
        raise InputError(f"--output {given}: give a folder to create, not the root")
    output = absolute.parent.resolve() / absolute.name
    real = output.resolve()
    for source in filter(None, sources):
        source = Path(source).expanduser().resolve()
        if source.exists() and not source.is_dir():
            continue  # a file is no model folder; a path not there yet (the default model
            # before its conversion, a hub name) is protected as well
        if real == source or source in real.parents:
            where = "is" if real == source else "lies inside"
            raise InputError(
                f"--output {given} {where} the model folder {source}: the source is never "
                "replaced or written into; choose another folder"
            )
        if real in source.parents:
            raise InputError(
                f"--output {given} holds the model folder {source}: the source is never "
                "replaced; choose another folder"
            )
    if output.is_symlink():
        raise InputError(f"--output {given} is a symbolic link (to {real}): give a folder, not a link")
    if output.exists():
        if not output.is_dir():
            raise InputError(f"--output {given} is a file, not a folder")
        entries = sorted(os.listdir(output))
        if entries and not overwrite:
            raise InputError(
                f"--output {given} already holds {len(entries)} entries (e.g. {entries[0]!r}): "
                "give a new or empty folder, or --overwrite to replace it whole"
            )
        if entries and not (output / "config.json").is_file():
            raise InputError(
                f"--output {given} holds files but no model (no config.json): --overwrite "
                "replaces only a model folder; choose another folder"
            )
    existing = next(folder for folder in output.parents if os.path.lexists(folder))
    if not existing.is_dir():
        raise InputError(f"--output {given}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output {given}: no permission to write in {existing}")
    return output


def first_non_finite(model: torch.nn.Module) -> tuple[str, str, int] | None:
    """The first floating parameter or buffer of ``model`` holding a NaN or an
    infinity (weights, scales, zero points, norms...): ``(module name, tensor
    name, how many values)``; ``None`` when every one is finite."""
    for module_name, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for tensor_name, tensor in tensors:
            if tensor is None or tensor.is_meta or not tensor.is_floating_point():
                continue
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                return module_name, tensor_name, count
    return None


def _non_finite_problem(model, when: str = "") -> str | None:
    found = first_non_finite(model)
    if found is None:
        return None
    module, tensor, count = found
    values = "value" if count == 1 else "values"
    return f"module {module or '(the model itself)'} has non-finite {tensor} ({count} {values}){when}; nothing saved"


def save_checkpoint(
    model, tokenizer, output: Path, dtype: torch.dtype | None = torch.bfloat16, overwrite: bool = False
) -> Path:
    """Save ``model`` compressed (``pack-quantized``) in ``dtype`` (scales and the
    unquantized tensors; the packed integers do not change), with its tokenizer;
    the absolute path of the saved folder.

    Nothing is written unless every floating tensor is finite (before and after
    the cast) and :func:`check_output` accepts ``output`` (the folder the model
    was loaded from protected). The files go to a new hidden folder beside ``output``
    (``.NAME.tmp-PID-RANDOM``), are made readable by all (umask permitting; only
    these files, links never followed), and that folder is renamed to ``output``
    once complete; with ``overwrite`` an existing ``output`` is moved aside first
    and removed after, never merged. Any failure removes the new folder and
    leaves ``output`` as it was.

    Under torch.distributed every rank must call it: compressed-tensors compresses
    the model on all ranks together, then rank 0 alone checks the folder, writes
    and renames; the ranks agree on a refusal first, so none waits for the others."""
    import torch.distributed as dist

    writer = not dist.is_initialized() or dist.get_rank() == 0
    problem = staging = None
    if writer:
        try:
            output = check_output(output, overwrite, _model_folders(model))
        except InputError as error:
            problem = str(error)
    problem = problem or _non_finite_problem(model)
    if problem is None and dtype is not None:
        model.to(dtype)
        problem = _non_finite_problem(model, f" in {str(dtype).removeprefix('torch.')}")
    if problem is None and writer:
        try:
            staging = _new_staging_folder(output)
        except OSError as error:
            problem = f"--output {output}: cannot create a folder beside it: {error.strerror}"
    problem = _same_on_every_rank(problem)
    if problem is not None:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise InputError(problem)
    if not writer:
        model.save_pretrained(output, save_compressed=True)  # compresses with rank 0, writes nothing
        return Path(os.path.abspath(output))
    try:
        model.save_pretrained(staging, save_compressed=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _make_readable(staging)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _model_folders(model) -> list[str]:
    """The folder ``model`` was loaded from (or its hub name), to protect."""
    source = getattr(model, "name_or_path", None)
    return [source] if source else []


def _same_on_every_rank(problem: str | None) -> str | None:
    """Under torch.distributed, the first rank's problem, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((found for found in problems if found is not None), None)


def _sibling(output: Path, kind: str) -> Path:
    # hidden, beside output: same file system, so the renames are atomic
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _new_staging_folder(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output, "tmp")
    staging.mkdir()
    return staging


def _make_readable(folder: Path) -> None:
    """Regular files under ``folder`` (all written by this save) readable by all,
    umask permitting; links are neither followed nor changed."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o666 & ~umask)


def _move_into_place(staging: Path, output: Path) -> None:
    """``staging`` renamed to ``output``; an existing ``output`` is moved aside
    first (put back if the rename fails) and removed after."""
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    aside = _sibling(output, "old")
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as error:
        print(f"warning: the replaced checkpoint could not be removed: {aside} ({error})", file=sys.stderr)


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
