"""README.md and docs/: the tables of numbers match benchmarks/results/ (scripts/tables.py --check),
and every relative link points at a file (and heading) that exists. Seconds, no model."""

import importlib.util
import re

from tests.models import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tables():
    spec = importlib.util.spec_from_file_location("tables", REPO / "scripts" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _anchors(path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_tables_are_generated_from_the_results():
    assert _tables().main(["--check"]) == 0, "run python scripts/tables.py"


def test_a_stale_table_is_reported(tmp_path, monkeypatch):
    tables = _tables()
    stale = tmp_path / "stale.md"
    stale.write_text("<!-- table:main -->\n| hand | edited |\n<!-- /table -->\n")
    monkeypatch.setattr(tables, "FILES", [stale])
    monkeypatch.setattr(tables, "REPO", tmp_path)
    assert tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and "| QEP + GPTQ (defaults) |" in stale.read_text()
    assert tables.main(["--check"]) == 0


def test_a_frontier_point_is_beaten_only_on_as_many_calibration_windows(tmp_path, monkeypatch):
    tables = _tables()
    (tmp_path / "runs").mkdir()
    header = "scheme,method,ppl,gap_recovered,calib_s,peak_rss_gib,rss_increase_gib,note,ppl_cross\n"
    for run, windows, method, ppl, seconds in [("small", 32, "slow", 80.0, 300), ("more", 128, "fast", 70.0, 100)]:
        (tmp_path / "runs" / f"{run}.csv").write_text(header + f"w2g64,{method},{ppl},,{seconds},1,1,x,90\n")
        (tmp_path / "runs" / f"{run}.md").write_text(f"Calibration: {windows} x 512 tokens of wiki_calib.txt\n")
    (tmp_path / "frontier.csv").write_text(
        "scheme,label,run,method\nw2g64,slow one,runs/small.csv,slow\nw2g64,fast one,runs/more.csv,fast\n"
    )
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    table = tables.frontier_table("w2g64")
    assert "| fast one | 128 | 100 | 70.00 | 90.00 | yes |" in table
    assert "| slow one | 32 | 300 | 80.00 | 90.00 | yes |" in table  # beaten only by more data
    (tmp_path / "runs" / "more.md").write_text("Calibration: 32 x 512 tokens of wiki_calib.txt\n")
    assert "| slow one | 32 | 300 | 80.00 | 90.00 |  |" in tables.frontier_table("w2g64")


def test_relative_links_and_anchors_exist():
    broken = []
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                broken.append(f"{document.name}: {target}")
            elif anchor and (resolved.suffix != ".md" or anchor not in _anchors(resolved)):
                broken.append(f"{document.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_doc_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [d.name for d in DOCUMENTS[1:] if f"docs/{d.name}" not in readme] == []
