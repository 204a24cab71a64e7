"""Benchmark QEP, FOEM and llm-compressor's GPTQ side by side, in one process.

    python benchmarks/run.py --schemes w3g64 --methods fp,gptq,qep_gptq

For one model, calibration text and evaluation text, every (scheme, method)
pair is quantized from the same calibration samples (fixed seed) and
evaluated with the WikiText-2 protocol (non-overlapping windows). Reported per
row: perplexity, calibration wall time, peak RSS during calibration, and the
share of stock GPTQModifier's perplexity gap to full precision that the method
recovers, ``(ppl_gptq - ppl) / (ppl_gptq - ppl_fp)``. Memory: the process's
peak RSS during calibration, and its increase over the RSS at the start of that
row (rows run one after another in one process, so the absolute peak carries
what earlier rows left allocated; the increase is the comparable number). The table (Markdown and
CSV) is rewritten after every row, so a cut-off run keeps what it finished;
a PNG chart is drawn at the end when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import platform
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bench"

# scheme name -> weights quantization args (int, all Linears but lm_head); a
# trailing "a" is the asymmetric grid (a zero point per group)
SCHEMES = {
    f"w{bits}{'g' + str(group) if group else 'ch'}{'' if symmetric else 'a'}": dict(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        **({"strategy": "group", "group_size": group} if group else {"strategy": "channel"}),
    )
    for bits in (2, 3, 4)
    for group in (32, 64, 128, None)
    for symmetric in (True, False)
}


def _gptq(**weights_extra):
    from llmcompressor.modifiers.gptq import GPTQModifier

    return lambda weights, **_: GPTQModifier(
        targets="Linear", ignore=["lm_head"], config_groups=_groups({**weights, **weights_extra})
    )


def _qep(weights_extra=None, **fields):
    def build(weights, **_):
        from qep_modifier import QEPModifier

        return QEPModifier(
            targets="Linear",
            ignore=["lm_head"],
            config_groups=_groups({**weights, **(weights_extra or {})}),
            **fields,
        )

    return build


def _rotated(build):
    """SpinQuant R1 + R2 (random Hadamard, fused into the weights) before ``build``."""

    def rotated(weights, **_):
        from llmcompressor.modifiers.transform import SpinQuantModifier

        return [SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"), build(weights)]

    return rotated


def _groups(weights: dict) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


BEST = {"observer": "memoryless_mse", "actorder": "static"}
# the mse observer searching clipping ranges down to 0.4x the group's range (its default stops
# at 0.8x: at 2 bits nearly every group's best clip lies below that)
WIDE = {**BEST, "observer_kwargs": {"maxshrink": 0.6}}

# method name -> (recipe builder or None for the unquantized model, extra oneshot kwargs, note)
METHODS = {
    "fp": (None, {}, "full precision"),
    "rtn": (_qep(base="rtn", propagation_strength=0.0, true_sequential=False), {}, "round to nearest (observer only)"),
    "gptq": (_gptq(), {}, "GPTQModifier, stock defaults"),
    "gptq_best": (_gptq(**BEST), {}, "GPTQModifier, mse observer, static act-order"),
    "gptq_no_propagation": (_gptq(), {"propagate_error": False}, "GPTQModifier, propagate_error=False"),
    "qep_rtn": (_qep(base="rtn"), {}, "QEP + RTN"),
    "qep_gptq": (_qep(), {}, "QEP + GPTQ (defaults)"),
    "qep_gptq_best": (_qep(weights_extra=BEST), {}, "QEP + GPTQ, mse observer, static act-order"),
    "qep_auto_best": (
        _qep(weights_extra=BEST, propagation_strength="auto"),
        {},
        "QEP + GPTQ, propagation_strength auto (every module), mse observer, static act-order",
    ),
    "gptq_sweep_scales": (
        _qep(weights_extra=BEST, propagation_strength=0.0, true_sequential=False, group_scales="sweep"),
        {},
        "GPTQ (QEPModifier with strength 0, no within-block order), mse group scales chosen in the sweep",
    ),
    "qep_sweep_scales": (
        _qep(weights_extra=BEST, group_scales="sweep"),
        {},
        "QEP + GPTQ, mse group scales chosen in the sweep (group-aware order)",
    ),
    "qep_auto_sweep_scales": (
        _qep(weights_extra=BEST, group_scales="sweep", propagation_strength="auto"),
        {},
        "QEP + GPTQ, auto strength, mse group scales chosen in the sweep",
    ),
    "spinquant_gptq_best": (_rotated(_gptq(**BEST)), {}, "SpinQuant R1+R2, then GPTQModifier, mse observer"),
    "spinquant_qep_best": (
        _rotated(_qep(weights_extra=BEST)), {}, "SpinQuant R1+R2, then QEP + GPTQ, mse observer"
    ),
    **{
        f"{'spinquant_' if rotated else ''}{method}_refit{rounds}_{search}": (
            (_rotated if rotated else lambda build: build)(
                _qep(weights_extra=observer, refit_scales=rounds, **fields)
            ),
            {},
            f"{'SpinQuant R1+R2, then ' if rotated else ''}{label}, scales refitted to the sweep's "
            f"codes ({rounds}x), mse observer{' (clip search to 0.4x)' if search == 'wide' else ''}",
        )
        for rounds in (1, 2, 3)
        for search, observer in (("best", BEST), ("wide", WIDE))
        for rotated in (False, True)
        for method, label, fields in (
            ("gptq", "GPTQ (QEPModifier strength 0)", dict(propagation_strength=0.0, true_sequential=False)),
            ("qep", "QEP + GPTQ", {}),
        )
    },
    "foem": (_qep(propagation_strength=0.0, first_order_strength=0.1), {}, "FOEM alone (beta 0.1)"),
    "qep_foem": (_qep(first_order_strength=0.1), {}, "QEP + FOEM (beta 0.1)"),
    # ablations
    **{
        f"qep_a{strength}": (
            _qep(propagation_strength={r"(^|\.)down_proj$": 0.0, "default": strength}),
            {},
            f"QEP, strength {strength}, down_proj uncorrected",
        )
        for strength in (0.0, 0.25, 0.75, 1.0)
    },
    **{
        f"qep_damp{damping}": (_qep(correction_damping=damping), {}, f"QEP, correction damping {damping}")
        for damping in (0.1, 1.0)
    },
    "qep_down_corrected": (_qep(propagation_strength=0.5), {}, "QEP, down_proj corrected too (0.5)"),
    # ablations on the rotated, twice-refitted recipe (low bits)
    **{
        f"spinquant_qep_refit2_sweep_damp{damping}": (
            _rotated(_qep(weights_extra=BEST, refit_scales=2, dampening_frac=damping)),
            {},
            f"SpinQuant R1+R2, then QEP + GPTQ, refit 2, GPTQ dampening_frac {damping}",
        )
        for damping in (0.05, 0.1)
    },
    **{
        f"spinquant_qep_refit2_a{strength}": (
            _rotated(
                _qep(
                    weights_extra=BEST,
                    refit_scales=2,
                    propagation_strength={r"(^|\.)down_proj$": 0.0, "default": strength},
                )
            ),
            {},
            f"SpinQuant R1+R2, then QEP + GPTQ, refit 2, strength {strength}, down_proj uncorrected",
        )
        for strength in (0.25, 0.75)
    },
    # block tuning on top of the rotated, refitted recipes, QEP and GPTQ alike
    **{
        f"spinquant_{method}_refit{rounds}_tuned{epochs}{'' if rate == 0.005 else f'_lr{rate}'}": (
            _rotated(
                _qep(
                    weights_extra=BEST,
                    refit_scales=rounds,
                    block_tuning_epochs=epochs,
                    block_tuning_learning_rate=rate,
                    **fields,
                )
            ),
            {},
            f"SpinQuant R1+R2, then {label}, refit {rounds}, block tuning {epochs} epoch(s)"
            + ("" if rate == 0.005 else f", learning rate {rate}")
            + " (group scales and norms to the full-precision layer output)",
        )
        for rounds, epochs, rate in ((2, 1, 0.005), (2, 2, 0.005), (3, 1, 0.005), (2, 3, 0.01), (2, 1, 0.01))
        for method, label, fields in (
            ("qep", "QEP + GPTQ", {}),
            ("gptq", "GPTQ (QEPModifier strength 0)", dict(propagation_strength=0.0, true_sequential=False)),
        )
    },
    "qep_no_true_sequential": (_qep(true_sequential=False), {}, "QEP, within-block order off"),
    "qep_no_cache": (
        _qep(cache_full_precision_inputs=False),
        {},
        "QEP, full-precision stream replayed, not cached (same numbers, less memory)",
    ),
    "qep_no_resume": (
        _qep(resume_replays=False),
        {},
        "QEP, replays recompute from the layer input (same numbers, less memory)",
    ),
    "qep_lean": (
        _qep(cache_full_precision_inputs=False, resume_replays=False),
        {},
        "QEP, neither cache nor resume (same numbers, least memory)",
    ),
    **{
        f"foem_b{beta}": (_qep(propagation_strength=0.0, first_order_strength=beta), {}, f"FOEM beta {beta}")
        for beta in (0.05, 0.2)
    },
    "foem_all_columns": (
        _qep(propagation_strength=0.0, first_order_strength=0.1, first_order_reach="all"),
        {},
        "FOEM beta 0.1, pull on all remaining columns",
    ),
}

COLUMNS = [
    "scheme", "method", "ppl", "gap_recovered", "calib_s", "peak_rss_gib", "rss_increase_gib", "note",
    "ppl_cross",
]


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def __enter__(self):
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def fill_gap_recovered(rows: list[dict]) -> None:
    """Fill ``gap_recovered`` against stock GPTQ and FP of the same scheme."""
    from qep_modifier.workflow import gap_recovered

    fp = next((row["ppl"] for row in rows if row["method"] == "fp"), None)
    for row in rows:
        gptq = next(
            (r["ppl"] for r in rows if r["method"] == "gptq" and r["scheme"] == row["scheme"]), None
        )
        row["gap_recovered"] = None if row["method"] == "fp" else gap_recovered(row["ppl"], gptq, fp)


def write_table(rows: list[dict], path: Path, header: str) -> None:
    fill_gap_recovered(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [
            row["scheme"],
            row["method"],
            fmt(row["ppl"], ".2f"),
            fmt(row["gap_recovered"], ".0%"),
            fmt(row["calib_s"], ".0f"),
            fmt(row["peak_rss_gib"], ".2f"),
            fmt(row["rss_increase_gib"], ".2f"),
            row["note"],
            fmt(row.get("ppl_cross"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def draw_chart(rows: list[dict], path: Path) -> bool:
    from qep_modifier.workflow import bar_chart

    schemes = sorted({row["scheme"] for row in rows if row["method"] != "fp"})
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "fp"]
    series = {
        method: [
            next((r["ppl"] for r in rows if r["method"] == method and r["scheme"] == s), math.nan)
            for s in schemes
        ]
        for method in methods
    }
    fp = next((row["ppl"] for row in rows if row["method"] == "fp"), None)
    reference = None if fp is None else (f"fp {fp:.1f}", fp)
    return bar_chart(path, schemes, series, log=True, reference=reference)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: packaged SmolLM2-135M)")
    parser.add_argument("--calib", type=Path, default=SHARED / "wiki_calib.txt")
    parser.add_argument("--eval", type=Path, default=SHARED / "wiki_eval.txt")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=30)
    parser.add_argument(
        "--cross-eval", type=Path, default=None,
        help="a second evaluation text (e.g. ../shared/bench/austen.txt): column ppl_cross",
    )
    parser.add_argument("--cross-eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schemes", default="w3g64", help=f"comma list of {sorted(SCHEMES)}")
    parser.add_argument("--methods", default="fp,gptq,qep_gptq", help=f"comma list of {list(METHODS)}")
    parser.add_argument("--output", type=Path, default=None, help="table path (.md); default benchmarks/results/<model>.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: merge these result CSVs (their .md beside them give the commands) "
        "into --output, later files winning for the same scheme and method",
    )
    args = parser.parse_args(argv)
    args.schemes = args.schemes.split(",")
    args.methods = args.methods.split(",")
    for name in args.schemes:
        if name not in SCHEMES:
            parser.error(f"--schemes: unknown {name!r}; allowed: {', '.join(sorted(SCHEMES))}")
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"--methods: unknown {name!r}; allowed: {', '.join(METHODS)}")
    return args


def read_rows(path: Path) -> list[dict]:
    """Rows of a result CSV, numbers as floats (None where empty)."""
    numeric = {"ppl", "gap_recovered", "calib_s", "peak_rss_gib", "rss_increase_gib", "ppl_cross"}
    with path.open(newline="") as handle:
        rows = [
            {key: (float(value) if value else None) if key in numeric else value for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]
    # tables from older harness versions lack some columns
    return [{column: row.get(column) for column in COLUMNS} for row in rows]


def report_chosen_strengths(recipe, scheme: str, method: str, output: Path) -> None:
    """``propagation_strength: auto``: how often each strength was chosen per
    module type, printed and written to ``<output>-strengths.json``."""
    modifiers = recipe if isinstance(recipe, list) else [recipe]
    chosen = {}
    for modifier in modifiers:
        chosen.update(getattr(modifier, "chosen_strengths", {}) or {})
    if not chosen:
        return
    counts: dict[str, dict[str, int]] = {}
    for name, strength in chosen.items():
        role = counts.setdefault(name.rsplit(".", 1)[-1], {})
        role[str(strength)] = role.get(str(strength), 0) + 1
    print(f"STRENGTHS {scheme} {method} {json.dumps(counts, sort_keys=True)}", flush=True)
    path = Path(output).with_name(Path(output).stem + "-strengths.json")
    everything = json.loads(path.read_text()) if path.is_file() else {}
    everything[f"{scheme} {method}"] = {"per_type": counts, "per_module": chosen}
    path.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")


def merge(sources: list[Path], output: Path) -> list[dict]:
    """One table from several runs' CSVs; the header lists each run's command."""
    merged: dict[tuple[str, str], dict] = {}
    described = []
    for source in sources:
        for row in read_rows(source):
            merged[(row["scheme"], row["method"])] = row
        markdown = source.with_suffix(".md")
        lines = markdown.read_text().splitlines() if markdown.is_file() else []
        described.append(
            f"- `{source.name}`: "
            + "; ".join(line.rstrip(" ") for line in lines if line.startswith(("Command:", "Machine:", "Calibration:")))
        )
    order = {scheme: index for index, scheme in enumerate(SCHEMES)}
    method_order = {method: index for index, method in enumerate(METHODS)}
    rows = sorted(
        merged.values(),
        key=lambda row: (row["method"] != "fp", order.get(row["scheme"], -1), method_order.get(row["method"], 99)),
    )
    header = (
        f"# {output.stem}: QEP / FOEM / GPTQModifier\n\n"
        "Merged from these runs (same model, texts, samples and seed; "
        "`python benchmarks/run.py --merge ...`):\n" + "\n".join(described) + "\n\n"
        "gap_recovered = (ppl_gptq - ppl) / (ppl_gptq - ppl_fp), GPTQ = stock GPTQModifier of the same scheme."
    )
    write_table(rows, output, header)
    if draw_chart(rows, output.with_suffix(".png")):
        print(f"chart: {output.with_suffix('.png')}")
    print(output.read_text())
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.merge:
        if args.output is None:
            raise SystemExit("--merge needs --output (the merged table's .md path)")
        return merge(args.merge, args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from qep_modifier.default_model import default_model_path
    from qep_modifier.workflow import (
        calibration_windows,
        load_causal_lm,
        quantize,
        score,
        scoring_windows,
    )

    model_path = Path(args.model) if args.model else default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration = calibration_windows(tokenizer, args.calib, args.num_samples, args.seq_len, seed=args.seed)
    windows = scoring_windows(tokenizer, args.eval, args.seq_len, args.eval_windows)
    cross = (
        None if args.cross_eval is None
        else scoring_windows(tokenizer, args.cross_eval, args.seq_len, args.cross_eval_windows)
    )
    output = args.output or REPO / "benchmarks" / "results" / f"{model_path.name}.md"
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# {model_path.name}: QEP / FOEM / GPTQModifier\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {platform.machine()}, {psutil.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}  \n"
        f"Calibration: {args.num_samples} x {args.seq_len} tokens of {args.calib.name} (seed {args.seed}); "
        f"evaluation: {windows.shape[0]} x {args.seq_len} tokens of {args.eval.name}"
        + ("" if cross is None else f"; ppl_cross: {cross.shape[0]} x {args.seq_len} of {args.cross_eval.name}")
        + ".  \n"
        "gap_recovered = (ppl_gptq - ppl) / (ppl_gptq - ppl_fp), GPTQ = stock GPTQModifier of the same scheme."
    )
    rows: list[dict] = []
    for scheme in args.schemes:
        for method in args.methods:
            if method == "fp" and any(row["method"] == "fp" for row in rows):
                continue
            build, extra, note = METHODS[method]
            print(f"== {scheme} {method}: {note}", flush=True)
            start = time.perf_counter()
            with PeakRSS() as memory:
                if build is None:
                    model = load_causal_lm(model_path)
                else:
                    recipe = build(SCHEMES[scheme])
                    model = quantize(model_path, recipe, calibration, **extra)
            elapsed = time.perf_counter() - start
            ppl = score(model, windows)
            rows.append(
                dict(
                    scheme="-" if method == "fp" else scheme,
                    method=method,
                    ppl=ppl,
                    gap_recovered=None,
                    calib_s=None if build is None else elapsed,
                    peak_rss_gib=None if build is None else memory.peak / 2**30,
                    rss_increase_gib=None if build is None else (memory.peak - memory.start) / 2**30,
                    note=note,
                    ppl_cross=None if cross is None else score(model, cross),
                )
            )
            print(f"RESULT {json.dumps(rows[-1])}", flush=True)
            if build is not None:
                report_chosen_strengths(recipe, scheme, method, output)
            write_table(rows, output, header)
            del model
            gc.collect()
    if draw_chart(rows, output.with_suffix(".png")):
        print(f"chart: {output.with_suffix('.png')}")
    print(output.read_text())
    return rows


if __name__ == "__main__":
    main()
