"""Smoke test of benchmarks/run.py on a tiny random model (seconds); benchmarks/methods.yaml
builds the modifiers the methods were defined with before they became data."""

import csv
import hashlib
import importlib.util
import json
import math
from pathlib import Path

from tests.models import save_tiny_llama

from qep_modifier.end_to_end import DEFAULT_END_TO_END_LEARNING_RATE
from tests.models import REPO


def _harness():
    """benchmarks/run.py as benchmarks/autoround.py loads it: with the modifier classes only the
    benchmarks define (AutoRoundModifierZeroPointsFixed) registered."""
    spec = importlib.util.spec_from_file_location("benchmark_autoround", REPO / "benchmarks" / "autoround.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run


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


# fields added after the digests were taken, with their defaults: a dump leaves
# them out at their default, so a method that does not set them digests as before
_NEWER_FIELDS = {
    "block_tuning_code_learning_rate": 0.0,
    "end_to_end_epochs": 0,
    "end_to_end_learning_rate": DEFAULT_END_TO_END_LEARNING_RATE,
}


def _dump(modifier) -> dict:
    dump = modifier.model_dump(mode="json")
    for name, default in _NEWER_FIELDS.items():
        if name in dump and dump[name] == default:
            del dump[name]
    return dump


def _digest(modifiers, oneshot) -> str:
    text = json.dumps(
        [[type(modifier).__name__, _dump(modifier)] for modifier in modifiers or []] + [oneshot],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_methods_build_the_modifiers_they_were_defined_with():
    """benchmark_methods.json: per scheme and method, a digest of the modifiers (``model_dump``)
    and extra oneshot keywords that run.py's METHODS dict built before the methods moved to
    benchmarks/methods.yaml (commit 2572048), and the AutoRound rows benchmarks/autoround.py built in
code before they became rows too (commit e57dfd2); every old name still builds exactly those."""
    harness = _harness()
    expected = json.loads((Path(__file__).with_name("benchmark_methods.json")).read_text())
    for scheme, methods in expected.items():
        for name, digest in methods.items():
            method = harness.METHODS[name]
            modifiers = method.build(harness.SCHEMES[scheme])
            assert _digest(modifiers, method.oneshot) == digest, (scheme, name)
            if "zpfix" in name:  # the same fields, on the class that passes zero points on
                assert type(modifiers[0]).__qualname__ == "AutoRoundModifier (zero points fixed)"


def test_every_shipped_recipe_is_a_method_on_its_grid():
    harness = _harness()
    shipped = sorted(path.stem for path in (REPO / "qep_modifier" / "recipes").glob("*.yaml"))
    recipes = {method.recipe: method for method in harness.METHODS.values() if method.recipe}
    assert sorted(recipes) == shipped
    for name, method in recipes.items():
        assert method.scheme in harness.SCHEMES
        assert [type(m).__name__ for m in method.build(None)][-1] in ("QEPModifier", "FOEMModifier"), name
