"""qep-demo (README's first command) end to end on a tiny random Llama."""

import json
import math
import re
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch

from tests.models import VOCAB_SIZE, save_tiny_llama
from qep_modifier import demo
from qep_modifier.workflow import InputError



def test_bundled_text_is_there_and_long_enough():
    text = demo.DEFAULT_TEXT.read_text(encoding="utf-8")
    assert "public domain" in text.splitlines()[0].lower()
    assert len(text.split()) > 15_000  # 16 x 512 calibration + 10 x 512 evaluation tokens


def _demo_recipe_modifier():
    return demo._recipe_modifier(demo._load(demo.DEFAULT_RECIPE), demo.DEFAULT_RECIPE)


def test_comparison_uses_the_recipes_scheme_stock_and_with_its_observer():
    modifiers = demo.comparison_modifiers(_demo_recipe_modifier())
    stock, tuned = modifiers.values()
    assert list(modifiers) == ["GPTQModifier (stock)", "GPTQModifier (weight_observer=memoryless_mse)"]
    assert type(stock).__name__ == type(tuned).__name__ == "GPTQModifier"
    assert stock.weight_observer is None and tuned.weight_observer == "memoryless_mse"
    weights = stock.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric) == (3, 64, True)
    assert stock.ignore == ["lm_head"]


def test_comparison_modifiers_hold_copies_of_the_recipes_scheme():
    # checking the recipe against a model resolves act-order into the recipe's own
    # arguments; the GPTQModifiers it is compared with must not see that
    recipe = _demo_recipe_modifier()
    stock, tuned = demo.comparison_modifiers(recipe).values()
    recipe.config_groups["group_0"].weights.actorder = "weight"
    recipe.config_groups["group_0"].weights.group_size = 32
    for modifier in (stock, tuned):
        weights = modifier.config_groups["group_0"].weights
        assert weights.actorder != "weight" and weights.group_size == 64


def test_split_text_refuses_a_text_too_short():
    with pytest.raises(InputError, match="too few"):
        demo.split_text(torch.arange(1000), seq_len=512)
    calibration, evaluation = demo.split_text(torch.arange(3000), seq_len=512)
    assert calibration.numel() == 2000 and evaluation.numel() == 1000
    assert calibration[-1] + 1 == evaluation[0]  # disjoint, nothing dropped


def test_rejects_a_recipe_that_is_not_qep(tmp_path):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      targets: [Linear]\n      scheme: W4A16\n")
    with pytest.raises(SystemExit, match="GPTQModifier"):
        demo.main(["--recipe", str(recipe)])


def test_demo_prints_the_table_and_saves_the_checkpoint(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny")
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(3, VOCAB_SIZE, (3000,), generator=generator).tolist()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    output = tmp_path / "out"
    printed = StringIO()
    with redirect_stdout(printed):
        assert demo.main([
            "--model", str(model), "--text", str(text), "--num-samples", "4",
            "--seq-len", "64", "--eval-windows", "3", "--output", str(output),
        ]) == 0
    table = printed.getvalue().split("method")[-1]
    rows = re.findall(r"^(full precision|GPTQModifier \(.*?\)|QEPModifier \(.*?\))\s+([\d.]+)", table, re.M)
    assert [label for label, _ in rows] == [
        "full precision",
        "GPTQModifier (stock)",
        "GPTQModifier (weight_observer=memoryless_mse)",
        "QEPModifier (w3a16_qep_gptq.yaml)",
    ]
    assert all(math.isfinite(float(ppl)) and float(ppl) > 1 for _, ppl in rows)
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
