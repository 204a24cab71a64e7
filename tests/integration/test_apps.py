"""What a newcomer meets in the command-line tools: one-line errors before any
model is loaded, a checkpoint ready to ship, a wheel that works outside the
repository."""

import json
import os
import shutil
import stat
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from loguru import logger
from safetensors.torch import load_file

from qep_modifier import cli, workflow
from tests.models import REPO, VOCAB_SIZE, save_tiny_llama

GOOD = (REPO / "recipes" / "w3a16_qep_gptq.yaml").read_text()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    model = save_tiny_llama(root / "tiny", num_hidden_layers=1)
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(3, VOCAB_SIZE, (2000,), generator=generator).tolist()
    text = root / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    return root, model, text


def _oneshot_error(workspace, recipe_text=GOOD, text=None, model=None, name="recipe.yaml"):
    root, tiny, default_text = workspace
    recipe = root / name
    recipe.write_text(recipe_text)
    with pytest.raises(SystemExit) as ended:
        cli.oneshot_main([
            "--model", str(model or tiny), "--recipe", str(recipe),
            "--dataset", str(text or default_text), "--num-samples", "2", "--seq-len", "32",
            "--output", str(root / "never"),
        ])
    message = str(ended.value)
    assert message.startswith("qep-oneshot: ") and "\n" not in message, message
    assert not (root / "never").exists()
    return message


def test_misspelled_field_names_the_closest_one(workspace):
    message = _oneshot_error(workspace, GOOD.replace("base: gptq", "propagation_strenght: 0.5"))
    assert "recipe.yaml" in message
    assert "has no field 'propagation_strenght' (did you mean 'propagation_strength'?)" in message
    assert "correction_damping" in message  # the fields that exist


def test_invalid_yaml_names_file_line_and_column(workspace):
    broken = "quant_stage:\n  quant_modifiers:\n    QEPModifier: [unclosed\n      targets: x\n"
    message = _oneshot_error(workspace, broken, name="broken.yaml")
    assert "broken.yaml, line" in message and "column" in message and "not valid YAML" in message


def test_out_of_range_value_is_one_line(workspace):
    message = _oneshot_error(workspace, GOOD.replace("base: gptq", "propagation_strength: 2"))
    assert "propagation_strength = 2 is outside the allowed range [0, 1]" in message


def test_empty_calibration_text_names_the_file(workspace):
    root = workspace[0]
    empty = root / "empty.txt"
    empty.write_text("")
    message = _oneshot_error(workspace, text=empty)
    assert f"text file {empty} is empty" in message


def test_group_size_that_does_not_fit_is_said_before_loading(workspace, tmp_path):
    # width 576 (SmolLM2's): group 128 fits neither the attention nor the MLP input
    model = save_tiny_llama(tmp_path / "wide", num_hidden_layers=1, hidden_size=576,
                            intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    recipe = GOOD.replace("group_size: 64", "group_size: 128")
    message = _oneshot_error(workspace, recipe, model=model)
    assert "group_size 128 does not divide the input width 576" in message
    assert "group sizes that fit every targeted module: 32, 64" in message


def test_unknown_recipe_lists_the_packaged_ones(workspace):
    root, tiny, text = workspace
    with pytest.raises(SystemExit, match="packaged recipes: .*w3a16_qep_gptq"):
        cli.oneshot_main(["--model", str(tiny), "--recipe", "no_such_recipe", "--dataset", str(text),
                          "--output", str(root / "never")])


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.oneshot_main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 32)" in out and "(default: 512)" in out and "(default: bfloat16)" in out


def test_the_console_script_starts_without_the_toolkits_device_warning():
    # a fresh process: llm-compressor warns about the device when it is imported
    script = Path(sys.executable).parent / "qep-oneshot"
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "(default: 32)" in run.stdout
    assert "No accelerator available" not in run.stdout + run.stderr


def test_checkpoint_is_ready_to_ship(workspace, tmp_path, capfd):
    root, tiny, text = workspace
    output = tmp_path / "ship"
    # a fresh process's logging: the toolkit's default handler on the real stderr
    logger.remove()
    logger.add(sys.stderr)
    assert cli.oneshot_main([
        "--model", str(tiny), "--recipe", "w3a16_qep_gptq", "--dataset", str(text),
        "--num-samples", "4", "--seq-len", "32", "--output", str(output),
    ]) == 0
    printed = capfd.readouterr()
    # the device is said once; the toolkit's repeated warning and recipe lines are gone
    assert printed.out.count("calibrating on the CPU") == 1
    assert "No accelerator available" not in printed.out + printed.err
    assert "Loading recipe from" not in printed.out + printed.err
    # served dtype, files readable by all
    config = json.loads((output / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["format"] == "pack-quantized"
    umask = os.umask(0)
    os.umask(umask)
    for path in output.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    # the saved recipe reads back as plain YAML and runs again: the same weights
    saved = output / "recipe.yaml"
    assert "!!python" not in saved.read_text()
    yaml.safe_load(saved.read_text())
    again = workflow.quantize(tiny, saved, workflow.calibration_windows(
        load_tokenizer(tiny), text, 4, 32, 0))
    workflow.save_checkpoint(again, load_tokenizer(tiny), tmp_path / "again")
    first, second = (load_file(folder / "model.safetensors") for folder in (output, tmp_path / "again"))
    assert first.keys() == second.keys() and any(key.endswith("weight_packed") for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_bfloat16_checkpoint_scores_as_in_memory(workspace, tmp_path):
    root, tiny, text = workspace
    tokenizer = load_tokenizer(tiny)
    windows = workflow.scoring_windows(tokenizer, text, 64, 8)
    model = workflow.quantize(
        tiny, workflow.load_recipe("w3a16_qep_gptq"), workflow.calibration_windows(tokenizer, text, 4, 32, 0)
    )
    in_memory = workflow.score(model, windows)
    workflow.save_checkpoint(model, tokenizer, tmp_path / "bf16", torch.bfloat16)
    with workflow.quiet_loading():
        saved = workflow.score(workflow.load_causal_lm(tmp_path / "bf16", torch.bfloat16), windows)
    # bfloat16 keeps 8 bits of mantissa: perplexity within a few parts in a thousand
    assert abs(saved - in_memory) / in_memory < 5e-3, (saved, in_memory)


def test_eval_writes_its_table_under_out_by_default(workspace, tmp_path, monkeypatch):
    root, tiny, text = workspace
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workflow, "bar_chart", lambda *args, **kwargs: False)
    with redirect_stdout(StringIO()):
        assert cli.eval_main([str(tiny), "--text", str(text), "--seq-len", "64", "--max-windows", "1"]) == 0
    assert (tmp_path / "out" / "qep-eval" / "ppl.csv").is_file()
    assert not (tmp_path / "ppl.csv").exists()


def test_a_built_wheel_runs_the_demo_outside_the_repository(workspace, tmp_path):
    root, tiny, text = workspace
    wheels, prefix = tmp_path / "wheels", tmp_path / "prefix"
    run = dict(check=True, capture_output=True, text=True, timeout=600)
    # built from a copy of the sources: the build writes nothing into the repository
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], **run)
    (wheel,) = wheels.glob("qep_modifier-*.whl")
    # --ignore-installed: never touch the environment running the tests
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
                    str(prefix), str(wheel)], **run)
    site = next(prefix.glob("lib/python*/site-packages"))
    environment = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import qep_modifier; print(qep_modifier.__file__)"],
                           cwd=elsewhere, env=environment, **run).stdout
    assert str(site) in where  # the installed copy, not the source tree
    demo = subprocess.run(
        [str(prefix / "bin" / "qep-demo"), "--model", str(tiny), "--text", str(text),
         "--num-samples", "2", "--seq-len", "64", "--eval-windows", "2", "--output", "out"],
        cwd=elsewhere, env=environment, **run,
    )
    assert "QEPModifier (w3a16_qep_gptq.yaml)" in demo.stdout
    assert demo.stdout.count("calibrating on the CPU") == 1
    assert "No accelerator available" not in demo.stdout + demo.stderr
    assert (elsewhere / "out" / "config.json").is_file()
