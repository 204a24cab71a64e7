"""Console scripts: ``qep-oneshot`` (quantize) and ``qep-eval`` (perplexity, lm-eval).

    qep-oneshot --recipe recipes/w3a16_qep_gptq.yaml --dataset wiki --output out/smol-w3
    qep-eval fp out/smol-w3 --max-windows 40

Both default to the packaged SmolLM2-135M (``qep_modifier.default_model``) and to the
texts in ``../shared/bench/`` beside the repository when they are there. Bad input
(recipe, text, model folder, field values) ends them with one line, before any
model is loaded.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
from pathlib import Path

__all__ = ["oneshot_main", "eval_main", "resolve_dataset", "format_report"]

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
NAMED_TEXTS = {"austen": "austen.txt", "wiki": "wiki_calib.txt"}
DEFAULT_EVAL_TEXT = BENCH / "wiki_eval.txt"
DEFAULT_RESULTS = Path("out") / "qep-eval"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, descriptions as written."""


def resolve_dataset(value: str) -> Path | str:
    """A text file path, ``austen``/``wiki`` (texts in ../shared/bench), or the name
    of a dataset llm-compressor loads from the Hugging Face hub (``open_platypus``).

    Returns a ``Path`` for a text file (its content is checked when it is read),
    else the name unchanged (for oneshot); :class:`InputError` for a folder or a
    name that is none of these.
    """
    from qep_modifier.workflow import InputError

    path = Path(value).expanduser()
    if path.is_file():
        return path
    if value in NAMED_TEXTS:
        named = BENCH / NAMED_TEXTS[value]
        if not named.is_file():
            raise InputError(f"--dataset {value} means {named}, which does not exist")
        return named
    if path.is_dir():
        raise InputError(f"--dataset {value} is a folder; give a UTF-8 text file")
    if path.suffix in (".txt", ".md", ".text"):
        raise InputError(f"--dataset {value}: text file does not exist")
    hub = hub_datasets()
    if _registry_key(value) in hub:
        return value
    raise InputError(
        f"--dataset {value}: no such file, and not a named text (austen, wiki) nor a dataset "
        f"llm-compressor loads from the Hugging Face hub ({', '.join(sorted(hub))})"
    )


#: names in llm-compressor's dataset registry that a text model cannot calibrate on
#: by name alone: they need a file (custom, json, csv) or are images or speech
NOT_BY_NAME = {"custom", "json", "csv", "flickr", "flickr30k", "peoples-speech"}


def _registry_key(name: str) -> str:
    # how llm-compressor's registry looks names up (open_platypus -> open-platypus)
    return name.lower().replace("_", "-").replace(" ", "-")


def hub_datasets() -> set[str]:
    """The text datasets ``oneshot`` loads by name (llm-compressor's registry)."""
    from llmcompressor.transformers.data import TextGenerationDataset

    names = set(TextGenerationDataset.registered_names()) | set(TextGenerationDataset.registered_aliases())
    return {_registry_key(name) for name in names} - NOT_BY_NAME


def format_report(rows) -> str:
    """Fixed-width table of a modifier's ``error_report`` rows."""
    name_width = max([len("layer")] + [len(row["name"]) for row in rows])
    header = (
        f"{'layer':<{name_width}}  {'before':>12}  {'corrected':>12}  {'quantized':>12}"
    )
    lines = [
        "relative output error per layer, ||W X - V X~|| / ||W X||: W the original weight "
        "on the full-precision inputs X, V on the quantized-stream inputs X~ (before: V = W, "
        "corrected: V = the QEP-corrected weight, quantized: V = the final quantized weight; "
        "- where the layer is not corrected)",
        header,
        "-" * len(header),
    ]

    def cell(value):
        return f"{'-':>12}" if value is None else f"{float(value):>12.6f}"

    for row in rows:
        lines.append(
            f"{row['name']:<{name_width}}  {cell(row.get('before'))}  "
            f"{cell(row.get('corrected'))}  {cell(row.get('quantized'))}"
        )
    return "\n".join(lines)


def _modifiers_after_oneshot(recipe):
    """The modifiers oneshot ran.

    llm-compressor 0.14's ``Oneshot.apply_recipe_modifiers`` resets the global
    session *before* it initializes it, and ``post_process`` resets it afterwards
    only with ``clear_sparse_session=True`` (default False): after ``oneshot``
    returns, ``active_session().lifecycle.recipe.modifiers`` are the objects that
    ran. The recipe built here is the fallback (oneshot uses a Recipe as given).
    """
    from llmcompressor.core import active_session

    session_recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = list(getattr(session_recipe, "modifiers", None) or [])
    return modifiers or list(recipe.modifiers)


def _check_format(output: Path) -> str | None:
    config_path = output / "config.json"
    if not config_path.is_file():
        return None
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    formats = {quant.get("format")} | {
        group.get("format") for group in (quant.get("config_groups") or {}).values()
    }
    formats.discard(None)
    return ",".join(sorted(formats)) or None


def oneshot_main(argv: list[str] | None = None) -> int:
    from qep_modifier.workflow import DTYPES

    parser = argparse.ArgumentParser(
        prog="qep-oneshot",
        description="Quantize a model with a recipe (QEPModifier, FOEMModifier or any "
        "llm-compressor modifier) and save it compressed (pack-quantized).",
        formatter_class=_Help,
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face model folder, tokenizer included "
        "(none: the packaged SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--recipe", required=True,
        help="recipe YAML, or the name of a packaged recipe (e.g. w3a16_qep_gptq)",
    )
    parser.add_argument(
        "--dataset",
        default="wiki",
        help="calibration text: a UTF-8 text file; 'austen' or 'wiki' for "
        "../shared/bench/austen.txt or wiki_calib.txt; or a dataset llm-compressor loads by "
        "name from the Hugging Face hub (e.g. open_platypus, ultrachat_200k: needs the hub)",
    )
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="seed for the window positions")
    parser.add_argument(
        "--output", type=Path, required=True,
        help="where to save the checkpoint: a new or empty folder (never the model's own)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing checkpoint folder at --output whole (its files are removed)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="bfloat16",
        help="dtype of the saved checkpoint's scales and unquantized tensors (what is served)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="skip the per-layer error report (saves one d_in x d_in accumulator per layer)",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qep_modifier.workflow import InputError, one_line_errors

    with one_line_errors("qep-oneshot"):
        for name in ("num_samples", "seq_len"):
            if getattr(args, name) <= 0:
                raise InputError(
                    f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer"
                )
        return _oneshot(args)


def _oneshot(args) -> int:
    from qep_modifier.default_model import default_model_folder, default_model_path
    from qep_modifier.workflow import (
        DTYPES,
        calibration_windows,
        check_calibration_size,
        check_output,
        check_recipe_fits,
        check_seq_len,
        load_recipe,
        load_tokenizer,
        model_config,
        quantize,
        quiet_logs,
        say_device,
        save_checkpoint,
    )

    quiet_logs()
    # every check before any model is loaded
    check_output(args.output, args.overwrite, [args.model or default_model_folder()])
    recipe = load_recipe(args.recipe, report=not args.no_report)
    dataset_source = resolve_dataset(args.dataset)
    config = model_config(args.model)
    check_recipe_fits(config, recipe)
    check_seq_len(config, args.seq_len, args.model)
    check_calibration_size(config, args.num_samples, args.seq_len)

    model_path = args.model if args.model is not None else default_model_path()
    tokenizer = load_tokenizer(model_path)
    dataset = None
    if isinstance(dataset_source, Path):  # the text decodes and holds the windows asked for
        dataset = calibration_windows(
            tokenizer, dataset_source, args.num_samples, args.seq_len, args.seed
        )

    say_device("qep-oneshot")
    if dataset is not None:
        print(
            f"qep-oneshot: {args.num_samples} windows of {args.seq_len} tokens from "
            f"{dataset_source} (seed {args.seed})"
        )
        model = quantize(model_path, recipe, dataset)
    else:
        from llmcompressor import oneshot

        print(f"qep-oneshot: calibration dataset {dataset_source!r} from the Hugging Face hub")
        model = oneshot(
            model=str(model_path),
            dataset=dataset_source,
            recipe=recipe,
            num_calibration_samples=args.num_samples,
            max_seq_length=args.seq_len,
            shuffle_calibration_samples=False,
        )
    save_checkpoint(model, tokenizer, args.output, DTYPES[args.dtype], overwrite=args.overwrite)

    print()
    fmt = _check_format(args.output)
    if fmt == "pack-quantized":
        print(f"saved compressed ({fmt}, {args.dtype}) to {args.output}")
    else:
        print(f"warning: {args.output}/config.json says format {fmt!r}, not 'pack-quantized'")

    reported = False
    for modifier in _modifiers_after_oneshot(recipe):
        rows = getattr(modifier, "error_report", None)
        if not rows:  # no such attribute, or nothing recorded (--no-report)
            continue
        print()
        print(f"{type(modifier).__name__}:")
        print(format_report(rows))
        reported = True
    if not reported:
        print("no per-layer report for this modifier")
    return 0


# ---------------------------------------------------------------- qep-eval


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_lm_eval_paths(paths) -> None:
    """Refuse a path lm-eval would read as more than a path: its ``model_args``
    is a string of comma-separated ``key=value`` pairs, so a folder named
    ``x,trust_remote_code=True`` would add an option."""
    from qep_modifier.workflow import InputError

    for path in paths:
        if path is not None and ("," in str(path) or "=" in str(path)):
            raise InputError(
                f"--lm-eval: the path {path} contains ',' or '=', which lm-eval's model_args "
                "would read as more options; rename the folder or link it under a plain name"
            )


def _run_lm_eval(models, tasks, tokenizer) -> None:
    import lm_eval

    check_lm_eval_paths([tokenizer, *(path for _, path in models)])
    for label, path in models:
        model_args = f"pretrained={path}"
        if tokenizer is not None:
            model_args += f",tokenizer={tokenizer}"
        results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks)
        print(f"\nlm-eval: {label}")
        for task, metrics in (results or {}).get("results", {}).items():
            shown = ", ".join(
                f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                for key, value in metrics.items()
                if key != "alias"
            )
            print(f"  {task}: {shown}")


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qep-eval",
        description="Perplexity of checkpoints on a text (WikiText-2 protocol: the whole "
        "text tokenized once, non-overlapping windows), optionally lm-eval tasks.",
        formatter_class=_Help,
    )
    parser.add_argument(
        "checkpoints",
        nargs="*",
        help="model folders (compressed or not); the word 'fp' stands for --base-model",
    )
    parser.add_argument("--include-fp", action="store_true", help="also evaluate --base-model")
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="the full-precision model for 'fp' (none: the packaged SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--text",
        type=Path,
        default=DEFAULT_EVAL_TEXT if DEFAULT_EVAL_TEXT.is_file() else None,
        required=not DEFAULT_EVAL_TEXT.is_file(),
        help="evaluation text file",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=None, help="none: all windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (none: the first model's)"
    )
    parser.add_argument("--csv", type=Path, default=DEFAULT_RESULTS / "ppl.csv", help="results table")
    parser.add_argument(
        "--png", type=Path, default=DEFAULT_RESULTS / "ppl.png",
        help="bar chart, needs matplotlib (pip install -e '.[plot]')",
    )
    parser.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks to run on each model "
        "(needs lm_eval installed, and usually the hub for the task data)",
    )
    args = parser.parse_args(argv)
    from qep_modifier.workflow import one_line_errors, quiet_logs

    quiet_logs()
    with one_line_errors("qep-eval"):
        return _evaluate(parser, args)


def _evaluate(parser, args) -> int:
    from qep_modifier.workflow import InputError, read_text_file

    for option, value, least in (
        ("--seq-len", args.seq_len, 2),  # a window of one token predicts nothing
        ("--batch-size", args.batch_size, 1),
        ("--max-windows", args.max_windows, 1),
    ):
        if value is not None and value < least:
            raise InputError(f"{option} {value}: must be an integer >= {least}")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else []
    if args.lm_eval is not None and not _has_module("lm_eval"):
        raise InputError(
            "--lm-eval needs lm-evaluation-harness, which is not installed: pip install lm-eval"
        )

    models: list[tuple[str, Path | None]] = []
    if args.include_fp or "fp" in args.checkpoints:
        name = args.base_model.name if args.base_model else "SmolLM2-135M-Instruct"
        models.append((f"fp ({name})", args.base_model))
    for item in args.checkpoints:
        if item != "fp":
            models.append((item, Path(item)))
    if not models:
        parser.error("give at least one checkpoint, 'fp' or --include-fp")
    for _, path in models:
        if path is not None and not (path / "config.json").is_file():
            raise InputError(f"{path} is not a model folder (no config.json)")
    text = read_text_file(args.text)
    if tasks:
        check_lm_eval_paths([args.tokenizer, *(path for _, path in models)])

    import torch

    from qep_modifier.default_model import default_model_path
    from qep_modifier.evaluation import NonFiniteLogits, tokenize_text
    from qep_modifier.workflow import (
        bar_chart,
        check_seq_len,
        load_causal_lm,
        load_tokenizer,
        model_config,
        quiet_loading,
        score,
        scoring_windows,
    )

    for _, path in models:
        check_seq_len(model_config(path), args.seq_len, path)
    models = [(label, default_model_path() if path is None else path) for label, path in models]
    torch.set_grad_enabled(False)
    tokenizer_path = args.tokenizer or models[0][1]
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenize_text(tokenizer, text)
    windows = scoring_windows(tokenizer, ids, args.seq_len, args.max_windows)
    print(
        f"qep-eval: {args.text} -> {ids.numel()} tokens, {windows.shape[0]} windows of "
        f"{args.seq_len} (tokenizer {tokenizer_path})"
    )

    rows, failures = [], []
    for label, path in models:
        with quiet_loading():
            model = load_causal_lm(path)
        name = label if label == str(path) else f"{label} ({path})"
        try:
            value = score(model, windows, batch_size=args.batch_size, check_finite=True)
            if not math.isfinite(value):
                failures.append(f"{name}: perplexity {value} (its logits are finite)")
        except NonFiniteLogits as error:  # the other models are still scored and written
            value = float("nan")
            failures.append(
                f"{name}: {error} (of {windows.shape[0]} windows of {args.seq_len} tokens): "
                "the checkpoint has non-finite weights or overflows"
            )
        del model
        rows.append(
            {"model": label, "path": str(path), "perplexity": value,
             "windows": windows.shape[0], "seq_len": args.seq_len}
        )
        print(f"  {label}: {value:.4f}")

    width = max(len("model"), *(len(row["model"]) for row in rows))
    print()
    print(f"{'model':<{width}}  {'ppl':>12}  {'windows':>8}")
    print("-" * (width + 24))
    for row in rows:
        print(f"{row['model']:<{width}}  {row['perplexity']:>12.4f}  {row['windows']:>8}")

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "path", "perplexity", "windows", "seq_len"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.csv}")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    title = f"perplexity, {rows[0]['windows']} x {rows[0]['seq_len']} tokens"
    values = {"perplexity": [row["perplexity"] for row in rows]}
    if bar_chart(args.png, [row["model"] for row in rows], values, title=title):
        print(f"wrote {args.png}")
    else:
        print("matplotlib is not installed: chart skipped (pip install -e '.[plot]')")

    if failures:
        more = f" (and {len(failures) - 1} more model(s))" if len(failures) > 1 else ""
        raise InputError(f"not finite: {failures[0]}{more}")
    if tasks:
        _run_lm_eval(models, tasks, args.tokenizer)
    return 0
