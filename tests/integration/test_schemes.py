"""Every weight-only int scheme GPTQModifier accepts saves as pack-quantized and reloads."""

import json

import pytest
import torch

from qep_modifier import QEPModifier
from tests.models import group_scheme, load_model, logits, quantize, save_tiny_llama, token_dataset

SCHEMES = {
    "W4A16": dict(scheme="W4A16"),
    "W4A16_ASYM": dict(scheme="W4A16_ASYM"),
    "W3A16": dict(scheme="W3A16"),
    "W2A16": dict(scheme="W2A16"),
    "int8-g64": dict(config_groups=group_scheme(8, 64)),
    "int4-g32-asym-weight-order": dict(config_groups=group_scheme(4, 32, symmetric=False, actorder="weight")),
    "int2-g64-static-order": dict(config_groups=group_scheme(2, 64, actorder="static")),
    "int3-channel": dict(config_groups=group_scheme(3, None)),
    "int3-g32-full-range": dict(config_groups=group_scheme(3, 32, observer="full_range_mse")),
}
BITS = {"W4A16": 4, "W4A16_ASYM": 4, "W3A16": 3, "W2A16": 2}


@pytest.fixture
def model_dir(one_layer_llama):
    return one_layer_llama


@pytest.mark.parametrize("name", SCHEMES)
def test_scheme_saves_pack_quantized_and_reloads(model_dir, tmp_path, name):
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], **SCHEMES[name])
    held_out = torch.tensor(token_dataset(2, 24, seed=3)["input_ids"])
    model = quantize(model_dir, recipe, token_dataset(4, 32, seed=1), output_dir=str(tmp_path))
    in_memory = logits(model, held_out)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    expected_bits = BITS.get(name) or SCHEMES[name]["config_groups"]["group_0"]["weights"]["num_bits"]
    assert group["weights"]["num_bits"] == expected_bits
    assert group["input_activations"] is None
    torch.testing.assert_close(logits(load_model(tmp_path), held_out), in_memory, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_stay_full_precision_when_lm_head_is_quantized(tmp_path):
    # SmolLM2 ties lm_head to the embedding; quantizing lm_head must not
    # quantize (or correct) the embedding through the shared weight
    from tests.models import load_model, quantize, token_dataset

    model_dir = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    original = load_model(model_dir).model.embed_tokens.weight.detach().clone()
    model = quantize(
        model_dir,
        QEPModifier(targets="Linear", config_groups=group_scheme(3, 32)),
        token_dataset(4, 16, seed=1),
    )
    assert hasattr(model.lm_head, "weight_scale")
    assert torch.equal(model.model.embed_tokens.weight, original)
    assert not torch.equal(model.lm_head.weight, original)


def test_full_range_grid_keeps_signed_scales_through_refits_tuning_and_save(model_dir, tmp_path):
    # the full_range_mse observer's negative scales survive the sweep, the refits
    # and block tuning, are stored as they are and decode to the same model
    from safetensors.torch import load_file

    recipe = QEPModifier(
        targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32, observer="full_range_mse"),
        refit_scales=1, block_tuning_epochs=1,
    )
    held_out = torch.tensor(token_dataset(2, 24, seed=3)["input_ids"])
    model = quantize(model_dir, recipe, token_dataset(4, 32, seed=1), output_dir=str(tmp_path))
    in_memory = logits(model, held_out)
    q_proj = model.model.layers[0].self_attn.q_proj
    scale = q_proj.weight_scale.detach()
    assert (scale < 0).any() and (scale > 0).any()
    codes = q_proj.weight.detach().reshape(*scale.shape, 32) / scale[..., None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.round().min() == -4 and codes.round().max() == 3  # every level used
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight_scale"], scale.to(stored["model.layers.0.self_attn.q_proj.weight_scale"].dtype))
    torch.testing.assert_close(logits(load_model(tmp_path), held_out), in_memory, rtol=1e-4, atol=1e-4)
