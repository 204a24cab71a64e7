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

The methods are data: ``benchmarks/methods.yaml`` names each one and gives its
modifiers (or a recipe file), its extra ``oneshot`` keywords and its note; this
file is the harness only (windows, one process, timing, perplexity, tables).
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
import yaml

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


METHODS_FILE = Path(__file__).resolve().with_name("methods.yaml")
ROW_KEYS = {"modifiers", "recipe", "scheme", "oneshot", "note"}


class Method:
    """One row of ``benchmarks/methods.yaml`` (the file's header says what each key means)."""

    def __init__(self, name: str, note: str, modifiers=(), recipe=None, scheme=None, oneshot=None):
        self.name, self.note, self.modifiers = name, note, tuple(modifiers)
        self.recipe, self.scheme, self.oneshot = recipe, scheme, dict(oneshot or {})

    def __repr__(self) -> str:
        return f"Method({self.name!r})"

    def build(self, weights: dict):
        """The method's modifiers for one grid (``SCHEMES`` value); None for full precision."""
        if self.recipe is not None:
            from qep_modifier.workflow import load_recipe

            return list(load_recipe(self.recipe).modifiers)
        if not self.modifiers:
            return None
        return [_modifier(kind, fields, weights) for entry in self.modifiers for kind, fields in entry.items()]


#: modifier classes only the benchmarks define, by the name methods.yaml gives them: a function
#: returning the class (benchmarks/autoround.py adds AutoRoundModifierZeroPointsFixed)
BENCHMARK_MODIFIERS: dict = {}


def _modifier(kind: str, fields: dict, weights: dict):
    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.modifiers.quantization import QuantizationMixin

    import qep_modifier  # noqa: F401  (registers QEPModifier and FOEMModifier)

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    fields = dict(fields or {})
    registry = {**ModifierFactory._main_registry, **ModifierFactory._registered_registry}
    registry.update({name: make() for name, make in BENCHMARK_MODIFIERS.items()})
    if kind not in registry:
        raise SystemExit(
            f"{METHODS_FILE.name}: unknown modifier {kind!r} (the AutoRound rows run through "
            "benchmarks/autoround.py)"
        )
    if issubclass(registry[kind], QuantizationMixin):
        extra = fields.pop("weights", None) or {}
        fields = {
            "targets": "Linear",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**weights, **extra}}},
            **fields,
        }
    if kind in BENCHMARK_MODIFIERS:
        return registry[kind](**fields)
    return ModifierFactory.create(kind, allow_registered=True, allow_experimental=True, **fields)


def load_methods(path: Path = METHODS_FILE) -> dict[str, Method]:
    """Every method of ``path`` by name, in the file's order."""
    rows = yaml.safe_load(path.read_text())["methods"]
    methods = {}
    for name, row in rows.items():
        unknown = set(row) - ROW_KEYS
        if unknown or "note" not in row or (row.get("recipe") is None) != (row.get("scheme") is None):
            raise SystemExit(
                f"{path.name}: method {name!r}: keys {sorted(row)}; allowed {sorted(ROW_KEYS)}, "
                "`note` required, `recipe` and `scheme` together"
            )
        if row.get("scheme") is not None and row["scheme"] not in SCHEMES:
            raise SystemExit(f"{path.name}: method {name!r}: scheme {row['scheme']!r} is not one of {sorted(SCHEMES)}")
        methods[name] = Method(name, row["note"], row.get("modifiers") or (), row.get("recipe"), row.get("scheme"), row.get("oneshot"))
    return methods


METHODS = load_methods()

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


def machine_line(device: str | None = None) -> str:
    """The table header's machine: processor, cores, memory, torch, device."""
    if device is None:
        device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {psutil.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, {device}"
    )


def result_row(scheme, method, ppl, quantized, elapsed, memory, note, ppl_cross) -> dict:
    """One table row; calibration time and memory only for a quantized model."""
    return dict(
        scheme="-" if method == "fp" else scheme,
        method=method,
        ppl=ppl,
        gap_recovered=None,
        calib_s=elapsed if quantized else None,
        peak_rss_gib=memory.peak / 2**30 if quantized else None,
        rss_increase_gib=(memory.peak - memory.start) / 2**30 if quantized else None,
        note=note,
        ppl_cross=ppl_cross,
    )


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
        f"Machine: {machine_line()}  \n"
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
            row = METHODS[method]
            if row.scheme is not None and row.scheme != scheme:
                print(f"== {scheme} {method}: skipped, the recipe is written for {row.scheme}", flush=True)
                continue
            print(f"== {scheme} {method}: {row.note}", flush=True)
            start = time.perf_counter()
            with PeakRSS() as memory:
                recipe = row.build(SCHEMES[scheme])
                if recipe is None:
                    model = load_causal_lm(model_path)
                else:
                    model = quantize(model_path, recipe, calibration, **row.oneshot)
            elapsed = time.perf_counter() - start
            ppl = score(model, windows)
            rows.append(
                result_row(scheme, method, ppl, recipe is not None, elapsed, memory, row.note,
                           None if cross is None else score(model, cross))
            )
            print(f"RESULT {json.dumps(rows[-1])}", flush=True)
            if recipe is not None:
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
