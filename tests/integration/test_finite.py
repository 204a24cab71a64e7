"""Finite or nothing: a non-finite weight in the input model stops qep-oneshot
before calibration, in one line; block tuning that does not lower a block's
error leaves the block as it was quantized."""

import math
import shutil

import pytest
import torch

from qep_modifier import QEPModifier
from qep_modifier.cli import oneshot_main
from tests.models import (
    group_scheme,
    load_model,
    norm_weights,
    quantize,
    quantized_linears,
    token_dataset,
)

W3 = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
BROKEN = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("value", [math.nan, -math.inf], ids=["nan", "inf"])
def test_a_non_finite_input_weight_stops_qep_oneshot_before_calibration(
    one_layer_llama, tmp_path, monkeypatch, value
):
    model_dir = shutil.copytree(one_layer_llama, tmp_path / "model")
    model = load_model(model_dir)
    with torch.no_grad():
        model.get_submodule(BROKEN).weight[3, 5] = value
    model.save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{3 + i % 200}" for i in range(400)) + "\n")

    def calibrating(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(QEPModifier, "on_calibration_start", calibrating)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        oneshot_main(
            [
                "--model", str(model_dir), "--recipe", "w4a16_qep_gptq", "--dataset", str(text),
                "--num-samples", "2", "--seq-len", "16", "--output", str(output),
            ]
        )
    assert stop.value.code == (
        f"qep-oneshot: module {BROKEN} has 1 non-finite weight value (nan/inf); "
        "fix the model before quantizing"
    )
    assert not output.exists()


@pytest.fixture(scope="module")
def untuned(one_layer_llama):
    model = quantize(one_layer_llama, QEPModifier(**W3), token_dataset(2, 16, seed=0))
    return quantized_linears(model), norm_weights(model)


def test_block_tuning_that_diverges_leaves_every_block_as_quantized(
    one_layer_llama, untuned, warnings
):
    recipe = QEPModifier(block_tuning_epochs=1, block_tuning_learning_rate=1000.0, **W3)
    model = quantize(one_layer_llama, recipe, token_dataset(2, 16, seed=0))
    assert recipe.problems == {"tuning_fallback": ["model.layers.0"]}
    weights, norms = quantized_linears(model), norm_weights(model)
    assert all(torch.isfinite(t).all() for module in weights.values() for t in module.values())
    # the scales and norm weights the block had before tuning, bit for bit
    for name, module in untuned[0].items():
        for key, tensor in module.items():
            assert torch.equal(weights[name][key], tensor), (name, key)
    assert all(torch.equal(norms[name], norm) for name, norm in untuned[1].items())
    said = [message for message in warnings if "block_tuning_learning_rate: 1000.0" in message]
    assert len(said) == 1 and "too large (the default is 0.005)" in said[0]


def test_code_learning_that_diverges_leaves_the_codes_as_quantized(one_layer_llama, untuned, warnings):
    """The keep-or-fall-back check covers the codes: at a code rate of 1000 every
    latent code leaves its grid's range at the first step, the loss goes up, and
    the block keeps GPTQ's codes, scales and norm weights bit for bit."""
    recipe = QEPModifier(block_tuning_epochs=1, block_tuning_code_learning_rate=1000.0, **W3)
    model = quantize(one_layer_llama, recipe, token_dataset(2, 16, seed=0))
    assert recipe.problems == {"tuning_fallback": ["model.layers.0"]}
    weights, norms = quantized_linears(model), norm_weights(model)
    for name, module in untuned[0].items():
        for key, tensor in module.items():
            assert torch.equal(weights[name][key], tensor), (name, key)
    assert all(torch.equal(norms[name], norm) for name, norm in untuned[1].items())
    said = [message for message in warnings if "block_tuning_code_learning_rate: 1000.0" in message]
    assert len(said) == 1


def test_block_tuning_at_the_default_rate_is_kept(one_layer_llama, untuned, warnings):
    recipe = QEPModifier(block_tuning_epochs=1, **W3)  # block_tuning_learning_rate 0.005
    model = quantize(one_layer_llama, recipe, token_dataset(2, 16, seed=0))
    assert "tuning_fallback" not in recipe.problems
    norms = norm_weights(model)
    assert not torch.equal(norms["model.layers.0.input_layernorm"], untuned[1]["model.layers.0.input_layernorm"])
    assert not any("block_tuning_learning_rate" in message for message in warnings)
