"""Determinism, half-precision models and degenerate calibration sets."""

import pytest
import torch
from datasets import Dataset

from qep_modifier import QEPModifier
from tests.models import group_scheme, load_model, logits, quantize, quantized_linears, save_tiny_llama, token_dataset


@pytest.fixture
def model_dir(two_layer_llama):
    return two_layer_llama


def _recipe(**fields):
    return QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32), **fields)


def test_same_seed_and_data_give_bit_identical_weights(model_dir):
    data = token_dataset(6, 32, seed=4)
    first = quantized_linears(quantize(model_dir, _recipe(), data))
    second = quantized_linears(quantize(model_dir, _recipe(), data))
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)


def test_bfloat16_model_keeps_its_dtype_and_stays_close(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "bf16", num_hidden_layers=2, dtype="bfloat16")
    held_out = torch.tensor(token_dataset(2, 32, seed=5)["input_ids"])
    reference = logits(load_model(model_dir), held_out)
    model = quantize(model_dir, _recipe(), token_dataset(8, 32, seed=4), precision="bfloat16")
    weights = quantized_linears(model)
    assert all(values["weight"].dtype == torch.bfloat16 for values in weights.values())
    assert all(torch.isfinite(values["weight"].float()).all() for values in weights.values())
    error = torch.linalg.norm(logits(model, held_out) - reference) / torch.linalg.norm(reference)
    assert error < 0.5, error.item()


def test_degenerate_calibration_set_gives_finite_weights(model_dir):
    # every token the same: the inputs of each Linear are (nearly) rank one
    rows = [[7] * 32 for _ in range(4)]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 32] * 4})
    weights = quantized_linears(quantize(model_dir, _recipe(propagation_strength=1.0), data))
    assert len(weights) == 14
    for name, values in weights.items():
        for key, value in values.items():
            assert torch.isfinite(value.float()).all(), (name, key)
