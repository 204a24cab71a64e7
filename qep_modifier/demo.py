"""``qep-demo``: the main job. Quantize the packaged SmolLM2-135M with a QEP recipe
and with llm-compressor's own GPTQModifier, evaluate them and full precision,
print the perplexity table.

    qep-demo                                   # W3 g64 QEP recipe, bundled text
    qep-demo --recipe recipes/w2a16_qep_gptq.yaml --text my.txt

The text (default: an excerpt of Jane Austen's *Emma*, public domain, shipped
in the package) is tokenized once and split: calibration windows are drawn
(fixed seed) from its first two thirds, perplexity is measured on
non-overlapping windows of the last third. Every method sees the same samples.
Rows: full precision; GPTQModifier with stock defaults on the recipe's scheme;
GPTQModifier with the recipe's scheme *and* its weight observer and act-order
(so QEP is also compared on equal terms); the recipe itself. The recipe's
checkpoint is saved compressed to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import time
from pathlib import Path

__all__ = ["main", "DEFAULT_TEXT", "DEFAULT_RECIPE", "DEFAULT_OUTPUT", "comparison_modifiers", "split_text"]

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "austen_emma_excerpt.txt"
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "w3a16_qep_gptq.yaml"
CALIBRATION_SHARE = 2 / 3
#: the demo's own output: a run replaces the checkpoint an earlier run saved there
DEFAULT_OUTPUT = Path("out/smollm2-qep")


def split_text(token_ids, seq_len: int):
    """Token ids cut into a calibration part (first 2/3) and an evaluation part."""
    cut = int(token_ids.numel() * CALIBRATION_SHARE)
    calibration, evaluation = token_ids[:cut], token_ids[cut:]
    if calibration.numel() <= seq_len or evaluation.numel() < seq_len:
        from qep_modifier.workflow import InputError

        raise InputError(
            f"--text has {token_ids.numel()} tokens: too few for --seq-len {seq_len} "
            f"(needs more than {math.ceil(seq_len / (1 - CALIBRATION_SHARE))})"
        )
    return calibration, evaluation


def _recipe_modifier(recipe, path: Path):
    """The loaded recipe's single quantization modifier (QEPModifier or a subclass)."""
    from qep_modifier.modifier import QEPModifier
    from qep_modifier.workflow import InputError

    modifiers = list(recipe.modifiers)
    ours = [modifier for modifier in modifiers if isinstance(modifier, QEPModifier)]
    if len(modifiers) != 1 or len(ours) != 1:
        names = ", ".join(type(modifier).__name__ for modifier in modifiers) or "none"
        raise InputError(
            f"--recipe {path}: qep-demo compares one QEPModifier (or FOEMModifier) "
            f"against GPTQModifier; the recipe has: {names}"
        )
    return ours[0]


def _load(path: Path):
    from qep_modifier.workflow import load_recipe

    return load_recipe(path, report=False)


def comparison_modifiers(recipe) -> dict[str, object]:
    """GPTQModifiers on the scheme of ``recipe`` (a QEPModifier): stock, and with
    its observer/act-order. They get copies of its scheme: checking the recipe
    against a model resolves act-order into the recipe's own arguments."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    common = dict(
        targets=recipe.targets,
        ignore=list(recipe.ignore),
        scheme=copy.deepcopy(recipe.scheme),
        config_groups=copy.deepcopy(recipe.config_groups),
    )
    common = {key: value for key, value in common.items() if value is not None}
    tuned = {
        key: getattr(recipe, key)
        for key in ("weight_observer", "actorder")
        if key in recipe.model_fields_set
    }
    modifiers = {"GPTQModifier (stock)": GPTQModifier(**common)}
    if tuned:
        described = ", ".join(f"{key}={value}" for key, value in tuned.items())
        modifiers[f"GPTQModifier ({described})"] = GPTQModifier(**common, **tuned)
    return modifiers


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, the description as written."""


def main(argv: list[str] | None = None) -> int:
    from qep_modifier.workflow import DTYPES, one_line_errors

    parser = argparse.ArgumentParser(prog="qep-demo", description=__doc__, formatter_class=_Help)
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE),
                        help="QEP/FOEM recipe YAML, or the name of a packaged recipe")
    parser.add_argument("--model", type=Path, default=None,
                        help="local HF folder (none: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help="plain text: calibration from its first 2/3, evaluation on the rest")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--eval-windows", type=int, default=8, help="evaluation windows (at most)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where the recipe's compressed checkpoint goes: a new or empty "
                        "folder; the default is replaced when it holds a checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint folder at --output whole")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="dtype of the saved checkpoint")
    args = parser.parse_args(argv)
    for name in ("num_samples", "seq_len", "eval_windows"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with one_line_errors("qep-demo"):
        return _run(args)


def _run(args) -> int:
    from transformers import AutoTokenizer

    from qep_modifier.default_model import default_model_folder, default_model_path
    from qep_modifier.evaluation import tokenize_text
    from qep_modifier.workflow import (
        DTYPES,
        InputError,
        calibration_windows,
        check_output,
        check_recipe_fits,
        load_causal_lm,
        model_config,
        quantize,
        quiet_logs,
        say_device,
        resolve_recipe,
        save_checkpoint,
        score,
        scoring_windows,
    )

    quiet_logs()
    # every check before any model is loaded
    overwrite = args.overwrite or args.output == DEFAULT_OUTPUT
    check_output(args.output, overwrite, [args.model or default_model_folder()])
    recipe_path = resolve_recipe(args.recipe)
    if not args.text.is_file():
        raise InputError(f"--text {args.text} does not exist")
    recipe = _load(recipe_path)
    modifier = _recipe_modifier(recipe, recipe_path)
    runs = {"full precision": None, **comparison_modifiers(modifier),
            f"{type(modifier).__name__} ({recipe_path.name})": recipe_path}
    check_recipe_fits(model_config(args.model), recipe)

    say_device("qep-demo")
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenize_text(tokenizer, args.text)
    if ids.numel() == 0:
        raise InputError(f"--text {args.text} is empty: it has no tokens")
    calibration_ids, evaluation_ids = split_text(ids, args.seq_len)
    calibration = calibration_windows(tokenizer, calibration_ids, args.num_samples, args.seq_len, args.seed)
    windows = scoring_windows(tokenizer, evaluation_ids, args.seq_len, args.eval_windows)
    print(f"qep-demo: {model_path.name}; calibration {args.num_samples} x {args.seq_len} tokens "
          f"(seed {args.seed}), evaluation {windows.shape[0]} x {args.seq_len} tokens, "
          f"from {args.text.name}", flush=True)

    rows = []
    for step, (label, recipe) in enumerate(runs.items(), start=1):
        print(f"\n[{step}/{len(runs)}] {label}", flush=True)
        start = time.perf_counter()
        if recipe is None:
            model = load_causal_lm(model_path)
        else:
            model = quantize(model_path, recipe, calibration)
        seconds = None if recipe is None else time.perf_counter() - start
        ppl = score(model, windows)
        if isinstance(recipe, Path):
            save_checkpoint(model, tokenizer, args.output, DTYPES[args.dtype], overwrite=overwrite)
        rows.append((label, ppl, seconds))
        print(f"[{step}/{len(runs)}] {label}: perplexity {ppl:.2f}", flush=True)
        del model
        gc.collect()

    print()
    print(format_table(rows))
    print(f"\ncompressed checkpoint of the recipe: {args.output}")
    return 0


def format_table(rows: list[tuple[str, float, float | None]]) -> str:
    """Method, perplexity, share of stock GPTQ's gap recovered, calibration time."""
    from qep_modifier.workflow import GAP_RECOVERED, gap_recovered

    fp = rows[0][1]
    gptq = rows[1][1] if len(rows) > 1 else None
    width = max(len("method"), *(len(label) for label, _, _ in rows))
    lines = [f"{'method':<{width}}  {'perplexity':>10}  {'gap recovered':>13}  {'calib s':>7}",
             "-" * (width + 38)]
    for index, (label, ppl, seconds) in enumerate(rows):
        recovered = gap_recovered(ppl, gptq, fp) if index >= 1 else None
        recovered = "" if recovered is None else f"{recovered:.0%}"
        timing = "" if seconds is None else f"{seconds:.0f}"
        lines.append(f"{label:<{width}}  {ppl:>10.2f}  {recovered:>13}  {timing:>7}")
    lines.append(GAP_RECOVERED)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
