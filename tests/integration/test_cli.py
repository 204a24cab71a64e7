"""qep-oneshot and qep-eval end to end on a tiny random Llama and a tiny text."""

import csv
import io
import math
import re
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from tests.models import VOCAB_SIZE, save_tiny_llama
from qep_modifier import cli, workflow
from qep_modifier.cli import eval_main, format_report, oneshot_main, resolve_dataset

from tests.models import REPO
RECIPE = REPO / "recipes" / "w4a16_qep_gptq.yaml"
NUM_LINEARS = 21  # 3 layers x (q, k, v, o, gate, up, down)


def write_text(path: Path, num_words: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (num_words,), generator=generator).tolist()
    lines = [" ".join(f"w{i}" for i in ids[start : start + 16]) for start in range(0, num_words, 16)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_llama(root / "tiny")
    calib = write_text(root / "calib.txt", 600, seed=1)
    heldout = write_text(root / "eval.txt", 300, seed=2)
    return root, model, calib, heldout


@pytest.fixture(scope="module")
def quantized(workspace):
    root, model, calib, _ = workspace
    output = root / "out-w4"
    captured = {}
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = oneshot_main(
            [
                "--model", str(model),
                "--recipe", str(RECIPE),
                "--dataset", str(calib),
                "--num-samples", "4",
                "--seq-len", "32",
                "--output", str(output),
            ]
        )
    captured["stdout"] = buffer.getvalue()
    captured["code"] = code
    return output, captured


def test_oneshot_saves_packed_checkpoint_and_prints_report(quantized):
    output, captured = quantized
    out = captured["stdout"]
    assert captured["code"] == 0
    assert "4 windows of 32 tokens" in out
    assert f"saved compressed (pack-quantized, bfloat16) to {output}" in out
    assert (output / "config.json").is_file() and (output / "tokenizer.json").is_file()
    assert "no per-layer report" not in out  # QEPModifier keeps error_report
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == NUM_LINEARS
    for row in rows:
        assert len(row) == 4
        numbers = [float(value) for value in row[1:] if value != "-"]
        assert len(numbers) == (2 if row[0].endswith("mlp.down_proj") else 3)  # default strengths
        assert all(math.isfinite(value) and value >= 0 for value in numbers)


def test_eval_table_and_csv(quantized, workspace, tmp_path, capsys, monkeypatch):
    root, model, _, heldout = workspace
    output, _ = quantized
    monkeypatch.setattr(workflow, "bar_chart", lambda *args, **kwargs: False)  # no matplotlib needed
    code = eval_main(
        [
            "fp", str(output),
            "--base-model", str(model),
            "--text", str(heldout),
            "--seq-len", "64",
            "--csv", str(tmp_path / "ppl.csv"),
            "--png", str(tmp_path / "ppl.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "300 tokens, 4 windows of 64" in out
    assert re.search(r"^model\s+ppl\s+windows$", out, re.MULTILINE)
    assert "chart skipped" in out
    with (tmp_path / "ppl.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(model), str(output)]
    for row in rows:
        ppl = float(row["perplexity"])
        assert math.isfinite(ppl) and 1.0 < ppl < 10 * VOCAB_SIZE
        assert row["windows"] == "4" and row["seq_len"] == "64"
        assert re.search(rf"^{re.escape(row['model'])}\s+{ppl:.4f}\s+4$", out, re.MULTILINE)
    # quantization changes the model: the two numbers differ
    assert rows[0]["perplexity"] != rows[1]["perplexity"]


def test_eval_lm_eval_calls_simple_evaluate(workspace, tmp_path, capsys, monkeypatch):
    root, model, _, heldout = workspace
    calls = []

    def simple_evaluate(model, model_args, tasks):
        calls.append((model, model_args, tasks))
        return {"results": {task: {"alias": task, "acc,none": 0.25} for task in tasks}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    monkeypatch.setattr(cli, "_has_module", lambda name: True)
    monkeypatch.setattr(workflow, "bar_chart", lambda *args, **kwargs: False)
    eval_main(
        [
            str(model), "--text", str(heldout), "--seq-len", "64", "--max-windows", "1",
            "--csv", str(tmp_path / "p.csv"), "--lm-eval", "arc_easy, hellaswag",
        ]
    )
    assert calls == [("hf", f"pretrained={model}", ["arc_easy", "hellaswag"])]
    out = capsys.readouterr().out
    assert "arc_easy: acc,none=0.2500" in out and "hellaswag" in out


def test_eval_lm_eval_missing_is_a_clear_error(workspace, monkeypatch):
    _, model, _, heldout = workspace
    monkeypatch.setattr(cli, "_has_module", lambda name: name != "lm_eval")
    with pytest.raises(SystemExit, match="lm-evaluation-harness, which is not installed"):
        eval_main([str(model), "--text", str(heldout), "--lm-eval", "arc_easy"])


def test_resolve_dataset(tmp_path):
    text = tmp_path / "some.txt"
    text.write_text("w3 w4")
    assert resolve_dataset(str(text)) == text
    assert resolve_dataset("open_platypus") == "open_platypus"  # left to oneshot / the hub
    for word, name in [("austen", "austen.txt"), ("wiki", "wiki_calib.txt")]:
        path = cli.BENCH / name
        if path.is_file():
            assert resolve_dataset(word) == path
        else:
            with pytest.raises(workflow.InputError, match=name):
                resolve_dataset(word)


def test_format_report_fixed_width():
    table = format_report(
        [
            {"name": "model.layers.0.self_attn.q_proj", "before": 0.5, "corrected": 0.25, "quantized": 0.125},
            {"name": "model.layers.0.mlp.down_proj", "before": 0.5, "corrected": None, "quantized": 0.1},
        ]
    ).splitlines()
    assert len({len(line) for line in table[1:]}) == 1  # header, rule and rows line up
    assert table[3].split() == ["model.layers.0.self_attn.q_proj", "0.500000", "0.250000", "0.125000"]
    assert table[4].split() == ["model.layers.0.mlp.down_proj", "0.500000", "-", "0.100000"]
