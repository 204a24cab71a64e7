"""Rewrite the tables of numbers in README.md and docs/*.md from benchmarks/results/.

    python scripts/tables.py          # rewrite every table in place
    python scripts/tables.py --check  # exit 1 naming each stale file (a test runs this)

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a Markdown file;
NAME is one of ``TABLES`` below. Each is built from the result CSVs that
``benchmarks/run.py`` writes (one row per scheme and method); ``recipes`` also reads
``benchmarks/results/recipes.csv`` (which run measured each shipped recipe, and against
which GPTQ row) and the recipe files themselves (bits per weight); ``frontier-*`` read
``benchmarks/results/frontier.csv`` (the points of the time-quality tables). Numbers are never typed
into the Markdown: change a CSV (or the specs here) and run the script.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RECIPES = REPO / "qep_modifier" / "recipes"
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def rows(name: str) -> dict[tuple[str, str], dict]:
    """A result CSV under benchmarks/results/ by (scheme, method); numbers as floats."""
    with (RESULTS / name).open(newline="") as handle:
        table = {}
        for row in csv.DictReader(handle):
            for key in ("ppl", "calib_s", "ppl_cross"):
                row[key] = float(row[key]) if row.get(key) else None
            table[(row["scheme"], row["method"])] = row
    return table


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def fp_ppl() -> float:
    return rows("SmolLM2-135M-Instruct.csv")[("-", "fp")]["ppl"]


def bits_per_weight(recipe: Path) -> float:
    """b + 16/g bits per weight (a 16-bit scale per group of g), + b/g more with a zero
    point (asymmetric); the W4A16 preset is int4, symmetric, group 128."""
    content = yaml.safe_load(recipe.read_text())
    for stage in content.values():
        for group in stage.values():
            for kind, fields in group.items():
                if kind in ("QEPModifier", "FOEMModifier"):
                    if fields.get("scheme") == "W4A16":
                        weights = dict(num_bits=4, symmetric=True, group_size=128)
                    else:
                        weights = fields["config_groups"]["group_0"]["weights"]
                    bits, group_size = weights["num_bits"], weights["group_size"]
                    return bits + (16 + (0 if weights["symmetric"] else bits)) / group_size
    raise ValueError(f"{recipe}: no QEPModifier or FOEMModifier")


def rounded(value: float) -> str:
    """Two decimals, halves up (4.125 bits per weight is 4.13)."""
    return str(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def recipes_table() -> str:
    """One row per shipped recipe: bits per weight, its measured wiki_eval perplexity, GPTQ's on
    equal terms and the calibration-time ratio where the two ran side by side."""
    with (RESULTS / "recipes.csv").open(newline="") as handle:
        specs = list(csv.DictReader(handle))
    listed = sorted(spec["recipe"] for spec in specs)
    shipped = sorted(path.stem for path in RECIPES.glob("*.yaml"))
    if listed != shipped:
        raise SystemExit(f"benchmarks/results/recipes.csv lists {listed}, qep_modifier/recipes/ holds {shipped}")
    body = [["full precision", "16", f"{fp_ppl():.2f}", "", "", ""]]
    for spec in specs:
        bits = rounded(bits_per_weight(RECIPES / (spec['recipe'] + '.yaml')))
        cells = [f"[`{spec['recipe']}`](qep_modifier/recipes/{spec['recipe']}.yaml)", bits]
        if not spec["run"]:
            body.append(cells + ["", "", "", spec["note"]])
            continue
        ours = rows(spec["run"])[(spec["scheme"], spec["method"])]
        # no gptq_run: GPTQ on equal terms not measured (the note says why)
        gptq = rows(spec["gptq_run"])[(spec["scheme"], spec["gptq_method"])] if spec["gptq_run"] else None
        ratio = f"{ours['calib_s'] / gptq['calib_s']:.2f}x" if gptq and spec["run"] == spec["gptq_run"] else ""
        source = f"`{spec['run'].removeprefix('runs/')}`" + (
            "" if spec["gptq_run"] in ("", spec["run"]) else f", `{spec['gptq_run'].removeprefix('runs/')}`"
        )
        note = source + (f"; {spec['note']}" if spec["note"] else "")
        body.append(cells + [f"{ours['ppl']:.2f}", f"{gptq['ppl']:.2f}" if gptq else "", ratio, note])
    header = ["recipe", "bits/weight", "wiki_eval ppl", "GPTQ, equal terms", "time x GPTQ", "measured in (benchmarks/results/runs/)"]
    return markdown(header, body)


MAIN_ROWS = [
    ("rtn", "round to nearest (observer only)"),
    ("gptq_no_propagation", "GPTQModifier, `propagate_error=False`"),
    ("gptq", "GPTQModifier (stock)"),
    ("gptq_best", "GPTQModifier, `memoryless_mse` observer, static act-order"),
    ("foem", "FOEM alone (beta 0.1)"),
    ("qep_rtn", "QEP + RTN"),
    ("qep_gptq", "QEP + GPTQ (defaults)"),
    ("qep_foem", "QEP + FOEM (beta 0.1)"),
    ("qep_gptq_best", "QEP + GPTQ, mse observer, static act-order"),
]


def grid_table(schemes: list[tuple[str, str]], methods: list[tuple[str, str]]) -> str:
    """Perplexity per method and scheme from the merged table, with the gap to stock
    GPTQModifier recovered in parentheses where positive; where stock GPTQModifier collapsed
    (over 10x full precision) the column shows whole numbers and no gaps."""
    table, fp = rows("SmolLM2-135M-Instruct.csv"), fp_ppl()
    body = []
    for method, label in methods:
        cells = [label]
        for scheme, _ in schemes:
            ppl, gptq = table[(scheme, method)]["ppl"], table[(scheme, "gptq")]["ppl"]
            if gptq > 10 * fp:
                cells.append(f"{ppl:.0f}")
                continue
            gap = (gptq - ppl) / (gptq - fp)
            cells.append(f"{ppl:.2f}" + (f" ({gap:.0%})" if method != "gptq" and gap > 0 else ""))
        body.append(cells)
    return markdown(["method"] + [title for _, title in schemes], body)


def main_table() -> str:
    return grid_table([("w4g64", "W4 g64"), ("w3g64", "W3 g64"), ("w2g64", "W2 g64")], MAIN_ROWS)


def channel_table() -> str:
    return grid_table(
        [("w4ch", "W4 channel"), ("w3ch", "W3 channel"), ("w2ch", "W2 channel")],
        [("gptq", "GPTQModifier (stock)"), ("qep_gptq", "QEP + GPTQ (defaults)")],
    )


def formatted(source: str, scheme: str, template: str) -> str:
    """``template`` with each ``{method}`` replaced by that method's perplexity in ``source``."""
    table = rows(source)
    return re.sub(r"\{([^}]+)\}", lambda match: f"{table[(scheme, match.group(1))]['ppl']:.2f}", template)


ABLATIONS = "runs/w3g64-ablations-16x512.csv"
ABLATION_ROWS = [
    ("propagation strength 0 (within-block order alone, no correction)", ABLATIONS, "{qep_a0.0}"),
    ("propagation strength 0.25", ABLATIONS, "{qep_a0.25}"),
    ("propagation strength 0.5 (default)", ABLATIONS, "{qep_gptq}"),
    ("propagation strength 0.75", ABLATIONS, "{qep_a0.75}"),
    ("propagation strength 1.0", ABLATIONS, "{qep_a1.0}"),
    ("correction damping 0.01 (default) / 0.1 / 1.0", ABLATIONS, "{qep_gptq} / {qep_damp0.1} / {qep_damp1.0}"),
    ("down_proj corrected too (0.5)", ABLATIONS, "{qep_down_corrected}"),
    (
        "within-block order off (32 x 512, session 1's run)",
        "runs/w3g64-32x512.csv",
        "{qep_no_true_sequential} (vs {qep_gptq} in that run)",
    ),
    ("FOEM alone, beta 0.05 / 0.1 / 0.2", ABLATIONS, "{foem_b0.05} / {foem} / {foem_b0.2}"),
]


def ablations_table() -> str:
    body = [[label, formatted(source, "w3g64", template)] for label, source, template in ABLATION_ROWS]
    return markdown(["change", "perplexity"], body)


TIMING_ROWS = [
    ("gptq", "GPTQModifier (stock)"),
    ("qep_gptq", "QEP + GPTQ (defaults)"),
    ("qep_no_cache", "QEP, `cache_full_precision_inputs: false`"),
    ("qep_no_resume", "QEP, `resume_replays: false`"),
    ("qep_lean", "QEP, both off (least memory)"),
]


def timing_table() -> str:
    table = rows("runs/w3g64-timing-core.csv")
    base = table[("w3g64", "gptq")]["calib_s"]
    body = []
    for method, label in TIMING_ROWS:
        row = table[("w3g64", method)]
        body.append([label, f"{row['calib_s']:.0f}", f"{row['calib_s'] / base:.2f}", f"{row['ppl']:.2f}"])
    return markdown(["method", "calibration s", "x GPTQModifier", "ppl (5 windows)"], body)


def calibration_windows(run: str) -> int:
    """How many calibration windows a run used, read from the ``Calibration: N x L tokens``
    line of the Markdown table written beside its CSV."""
    text = (RESULTS / run).with_suffix(".md").read_text()
    found = re.search(r"^Calibration: (\d+) x \d+ tokens", text, re.MULTILINE)
    if found is None:
        raise ValueError(f"{run}: no 'Calibration: N x L tokens' line beside it")
    return int(found.group(1))


def frontier_table(scheme: str) -> str:
    """Every point of ``benchmarks/results/frontier.csv`` for ``scheme`` (runs on one kind of
    machine, two threads, quiet), fastest first; a point is on the time-quality frontier when
    no other point calibrated on as many windows is at least as fast and more accurate (more
    calibration data is not equal terms)."""
    with (RESULTS / "frontier.csv").open(newline="") as handle:
        specs = [spec for spec in csv.DictReader(handle) if spec["scheme"] == scheme]
    points = []
    for spec in specs:
        row = rows(spec["run"])[(scheme, spec["method"])]
        points.append((row["calib_s"], row["ppl"], row["ppl_cross"], calibration_windows(spec["run"]), spec))
    points.sort(key=lambda point: (point[0], point[1]))
    body = []
    for seconds, ppl, cross, windows, spec in points:
        dominated = any(
            other[0] <= seconds and other[1] < ppl and other[3] == windows for other in points if other[4] is not spec
        )
        cross_cell = f"{cross:.2f}" if cross is not None else ""
        body.append([
            spec["label"], str(windows), f"{seconds:.0f}", f"{ppl:.2f}", cross_cell, "" if dominated else "yes",
            f"`{spec['run'].removeprefix('runs/')}` `{spec['method']}`",
        ])
    header = ["method", "windows", "calibration s", "wiki_eval", "Austen", "frontier",
              "measured in (benchmarks/results/runs/)"]
    return markdown(header, body)


VALUE_ROTATION_ROWS = [
    ("no rotation", "runs/w3g64-value-rotation.csv", "qep_refit2_tuned1_full_range"),
    ("value rotation (R2 alone, exact)", "runs/w3g64-value-rotation.csv", "values_qep_refit2_tuned1_full_range"),
    ("value rotation, `w3a16_values_qep` as shipped", "runs/w3g64-values-recipe.csv", "w3a16_values_qep"),
    ("value rotation, GPTQ on equal terms (QEPModifier strength 0)", "runs/w3g64-values-recipe.csv",
     "values_gptq_refit2_tuned1_full_range"),
    ("SpinQuant R1 + R2 (`w3a16_spinquant_qep` before end-to-end tuning; not exact on these families)", "runs/w3g64-full-range.csv",
     "spinquant_qep_refit2_tuned1_full_range"),
    ("`w3a16_qep_gptq` (mse observer, no refits, no tuning)", "runs/w3g64-full-range.csv", "qep_gptq_best"),
]


def value_rotation_table() -> str:
    """W3 g64 symmetric with and without the exact value rotation, beside SpinQuant's R1 + R2."""
    body = []
    for label, source, method in VALUE_ROTATION_ROWS:
        row = rows(source)[("w3g64", method)]
        cross = f"{row['ppl_cross']:.2f}" if row["ppl_cross"] is not None else ""
        body.append([label, f"{row['ppl']:.2f}", cross, f"`{source.removeprefix('runs/')}` `{method}`"])
    return markdown(["W3 g64 symmetric, full-range grid, refit 2, one tuning pass", "wiki_eval", "Austen",
                     "measured in (benchmarks/results/runs/)"], body)


TABLES = {
    "value-rotation": value_rotation_table,
    "frontier-w4g64": lambda: frontier_table("w4g64"),
    "frontier-w3g64": lambda: frontier_table("w3g64"),
    "frontier-w2g64": lambda: frontier_table("w2g64"),
    "recipes": recipes_table,
    "main": main_table,
    "channel": channel_table,
    "ablations": ablations_table,
    "timing": timing_table,
}


def render(text: str, path: Path) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{path}: unknown table {name!r}; known: {', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text()
        new = render(text, path)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale tables in {', '.join(map(str, stale))}: run python scripts/tables.py", file=sys.stderr)
        return 1
    for path in stale:
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
