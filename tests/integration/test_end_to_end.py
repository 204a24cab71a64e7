"""End-to-end tuning (``end_to_end_epochs``): the KL divergence against a float64
reference, and on a tiny Llama: codes held, scales and norms moved, the output
distribution closer to the full-precision model's, the checkpoint reloads; off,
the weights are those of the recipe without it."""

import pytest
import torch

from qep_modifier import QEPModifier
from qep_modifier.end_to_end import token_kl_divergence
from tests.models import (
    assert_reloads_packed, group_scheme, load_model, logits, norm_weights, quantize, quantized_linears,
)

W3 = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))


def test_token_kl_divergence_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    logits_q = torch.randn(2, 5, 11, generator=generator) * 3
    logits_p = torch.randn(2, 5, 11, generator=generator) * 3
    p = torch.softmax(logits_p.double(), -1)
    q = torch.softmax(logits_q.double(), -1)
    reference = (p * (p.log() - q.log())).sum(-1).mean()
    value = token_kl_divergence(logits_q, logits_p)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-7)
    assert token_kl_divergence(logits_p, logits_p).abs().item() < 1e-6


def _mean_kl(model, reference, ids) -> float:
    return token_kl_divergence(logits(model, ids), logits(reference, ids)).item()


def test_end_to_end_tuning_lowers_the_kl_holds_the_codes_and_reloads(tiny_llama, calibration, held_out, tmp_path):
    plain_model = quantize(tiny_llama, QEPModifier(block_tuning_epochs=1, **W3), calibration)
    plain = quantized_linears(plain_model)
    model = quantize(
        tiny_llama,
        QEPModifier(block_tuning_epochs=1, end_to_end_epochs=3, end_to_end_learning_rate=0.002, **W3),
        calibration,
    )
    tuned = quantized_linears(model)
    assert set(tuned) == set(plain)
    full_precision = load_model(tiny_llama)
    calibration_ids = torch.tensor(calibration["input_ids"])
    kl = {
        label: _mean_kl(m, full_precision, calibration_ids) for label, m in (("plain", plain_model), ("tuned", model))
    }
    assert kl["tuned"] < 0.9 * kl["plain"], kl
    for name in plain:  # every quantized Linear: same codes, other scales
        groups = torch.arange(tuned[name]["weight"].shape[1]) // 32
        codes = {
            label: weights[name]["weight"] / weights[name]["weight_scale"][:, groups]
            for label, weights in (("plain", plain), ("tuned", tuned))
        }
        assert (codes["tuned"] - codes["tuned"].round()).abs().max() < 1e-3, name  # on the grid
        assert torch.equal(codes["tuned"].round(), codes["plain"].round()), name
        assert not torch.equal(tuned[name]["weight_scale"], plain[name]["weight_scale"]), name
    norms = norm_weights(model)
    plain_norms = norm_weights(plain_model)
    assert "model.norm" in norms
    assert all(not torch.equal(norms[name], plain_norms[name]) for name in norms), "a norm was not tuned"
    assert torch.equal(model.lm_head.weight, plain_model.lm_head.weight)
    assert_reloads_packed(model, tmp_path / "out", held_out)


def test_end_to_end_tuning_off_leaves_the_weights_bit_identical(one_layer_llama, calibration):
    recipe = dict(block_tuning_epochs=1, **W3)
    off = quantized_linears(quantize(one_layer_llama, QEPModifier(**recipe), calibration))
    explicit = quantized_linears(quantize(one_layer_llama, QEPModifier(end_to_end_epochs=0, **recipe), calibration))
    for name in off:
        for key in off[name]:
            assert torch.equal(off[name][key], explicit[name][key]), (name, key)


def test_end_to_end_tuning_that_diverges_keeps_the_weights_it_had(one_layer_llama, calibration, warnings):
    recipe = dict(block_tuning_epochs=1, **W3)
    plain = quantized_linears(quantize(one_layer_llama, QEPModifier(**recipe), calibration))
    diverged = quantize(
        one_layer_llama, QEPModifier(end_to_end_epochs=1, end_to_end_learning_rate=1000.0, **recipe), calibration
    )
    for name, weights in quantized_linears(diverged).items():
        assert torch.equal(weights["weight_scale"], plain[name]["weight_scale"]), name
        assert torch.isfinite(weights["weight"]).all(), name
    assert any("end-to-end tuning did not lower" in message for message in warnings), warnings


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"end_to_end_epochs": -1}, ["end_to_end_epochs", "whole number >= 0"]),
        ({"end_to_end_learning_rate": 0.0}, ["end_to_end_learning_rate", "> 0"]),
    ],
)
def test_end_to_end_fields_are_checked_when_parsed(fields, words):
    with pytest.raises(ValueError) as error:
        QEPModifier(**W3, **fields)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_end_to_end_tuning_refuses_a_model_without_a_linear_output_embedding_in_one_line():
    from qep_modifier.checks import check_end_to_end_model

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError) as error:
        check_end_to_end_model(NoHead(), calibration=[{"input_ids": [1, 2]}])
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "end_to_end_epochs" in message and "NoHead" in message, message
    with pytest.raises(ValueError) as error:
        check_end_to_end_model(NoHead(), calibration=None)
    assert "end_to_end_epochs needs calibration data" in str(error.value)
    head = torch.nn.Linear(4, 8)

    class WithHead(torch.nn.Module):
        def get_output_embeddings(self):
            return head

    assert check_end_to_end_model(WithHead(), calibration=[{"input_ids": [1, 2]}]) is head
