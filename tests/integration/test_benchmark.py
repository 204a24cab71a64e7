"""Smoke test of benchmarks/run.py on a tiny random model (seconds)."""

import csv
import importlib.util
import math
from pathlib import Path

from tests.models import save_tiny_llama

from tests.models import REPO


def _harness():
    spec = importlib.util.spec_from_file_location("benchmark_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_writes_a_finite_table(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama", num_hidden_layers=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * index) % 250 + 3}" for index in range(4000)))
    output = tmp_path / "results" / "tiny.md"
    rows = _harness().main(
        [
            "--model", str(model_dir), "--calib", str(text), "--eval", str(text),
            "--num-samples", "4", "--seq-len", "32", "--eval-windows", "3",
            "--schemes", "w4g32", "--methods", "fp,gptq,qep_gptq", "--output", str(output),
        ]
    )
    assert [row["method"] for row in rows] == ["fp", "gptq", "qep_gptq"]
    with output.with_suffix(".csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0].keys()) == ["scheme", "method", "ppl", "gap_recovered", "calib_s", "peak_rss_gib", "rss_increase_gib", "note", "ppl_cross"]
    for row in table:
        assert math.isfinite(float(row["ppl"]))
    for row in table[1:]:
        for column in ("gap_recovered", "calib_s", "peak_rss_gib", "rss_increase_gib"):
            assert math.isfinite(float(row[column])), (row["method"], column)
    assert float(table[1]["gap_recovered"]) == 0.0  # GPTQ against itself
    markdown = output.read_text()
    assert "| scheme | method | ppl |" in markdown and "Command:" in markdown


def test_merge_joins_runs_and_recomputes_the_gap(tmp_path):
    harness = _harness()
    fields = dict(calib_s=1.0, peak_rss_gib=1.0, rss_increase_gib=0.1, note="")
    first = [dict(scheme="-", method="fp", ppl=10.0, gap_recovered=None, **fields),
             dict(scheme="w3g64", method="gptq", ppl=30.0, gap_recovered=None, **fields)]
    second = [dict(scheme="-", method="fp", ppl=10.0, gap_recovered=None, **fields),
              dict(scheme="w3g64", method="qep_gptq", ppl=15.0, gap_recovered=None, **fields),
              dict(scheme="w2g64", method="gptq", ppl=99.0, gap_recovered=None, **fields)]
    harness.write_table(first, tmp_path / "a.md", "Command: `python benchmarks/run.py --schemes w3g64`")
    harness.write_table(second, tmp_path / "b.md", "Command: `python benchmarks/run.py --schemes w2g64`")
    rows = harness.main(["--merge", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                         "--output", str(tmp_path / "merged.md")])
    assert [(row["scheme"], row["method"]) for row in rows] == [
        ("-", "fp"), ("w2g64", "gptq"), ("w3g64", "gptq"), ("w3g64", "qep_gptq")
    ]
    qep = rows[-1]
    assert qep["gap_recovered"] == (30.0 - 15.0) / (30.0 - 10.0)  # across the two runs
    markdown = (tmp_path / "merged.md").read_text()
    assert "--schemes w3g64" in markdown and "--schemes w2g64" in markdown
