"""Mixture-of-experts models: experts are corrected and quantized, unrouted
experts fall back to round-to-nearest, streams routed differently are not paired."""

import re

import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

from qep_modifier import QEPModifier
from qep_modifier.calibrate import CalibrationRun
from qep_modifier.strength import resolve_propagation_strength
from qep_modifier.modifier import DEFAULT_PROPAGATION_STRENGTH
from tests.models import group_scheme, quantize, quantized_linears, save_tiny_qwen3_moe, token_dataset

EXPERT = re.compile(r"model\.layers\.(\d)\.mlp\.experts\.(\d)\.(gate|up|down)_proj$")


def _recipe(**fields):
    return QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32), **fields)


def _on_grid(weights: dict[str, torch.Tensor]) -> bool:
    weight, scale = weights["weight"], weights["weight_scale"]
    steps = weight.reshape(weight.shape[0], scale.shape[1], -1) / scale.unsqueeze(-1)
    return torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 4


def test_experts_are_corrected_and_quantized(tmp_path, warnings):
    model_dir = save_tiny_qwen3_moe(tmp_path / "moe")
    calibration = token_dataset(4, 16, seed=1)
    corrected = quantized_linears(quantize(model_dir, _recipe(), calibration))
    plain = quantized_linears(quantize(model_dir, _recipe(propagation_strength=0.0), calibration))
    experts = [name for name in corrected if EXPERT.match(name)]
    assert len(experts) == 2 * 4 * 3  # layers x experts x projections
    for name in experts:
        assert torch.isfinite(corrected[name]["weight"]).all() and _on_grid(corrected[name]), name
        assert corrected[name]["weight"].abs().sum() > 0, name
    # layer 1's experts see a quantized layer 0: the correction moves their
    # gate/up weights (and so what their down_proj sees)
    moved = {
        EXPERT.match(name).group(3)
        for name in experts
        if name.startswith("model.layers.1.")
        and not torch.equal(corrected[name]["weight"], plain[name]["weight"])
    }
    assert {"gate", "up"} <= moved
    # every expert's down_proj is uncorrected by default, like mlp.down_proj
    strengths = {name: resolve_propagation_strength(name, DEFAULT_PROPAGATION_STRENGTH) for name in experts}
    assert {EXPERT.match(name).group(3) for name, value in strengths.items() if value == 0} == {"down"}
    assert not any("no calibration token" in message or "different tokens" in message for message in warnings)


def test_experts_in_one_group_per_role(tmp_path, monkeypatch):
    # experts run one after another; each role must be one within-block group,
    # not one group (and one replay) per expert
    seen_groups = []
    quantize_group = CalibrationRun.quantize_group

    def recording(run, modules, statistics, *args):
        seen_groups.append([run.names[module] for module in modules])
        quantize_group(run, modules, statistics, *args)

    monkeypatch.setattr(CalibrationRun, "quantize_group", recording)
    model_dir = save_tiny_qwen3_moe(tmp_path / "moe")
    quantize(
        model_dir,
        QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32)),
        token_dataset(4, 16, seed=1),
    )
    layer_0 = [group for group in seen_groups if group[0].startswith("model.layers.0.")]
    roles = [sorted({re.sub(r"experts\.\d+\.", "experts.*.", name) for name in group}) for group in layer_0]
    assert roles == [
        ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.experts.*.gate_proj", "model.layers.0.mlp.experts.*.up_proj"],
        ["model.layers.0.mlp.experts.*.down_proj"],
    ]
    assert [len(group) for group in layer_0] == [3, 1, 8, 4]


def test_unrouted_experts_fall_back_to_round_to_nearest(tmp_path, warnings):
    model_dir = save_tiny_qwen3_moe(tmp_path / "moe", unrouted_experts=True)
    recipe = _recipe()
    quantized = quantized_linears(
        quantize(model_dir, recipe, token_dataset(4, 16, seed=1), moe_calibrate_all_experts=False)
    )
    unquantized = linearize_moe(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    original = {
        name: module.weight.detach() for name, module in unquantized.named_modules() if EXPERT.match(name)
    }
    unrouted = [name for name in quantized if EXPERT.match(name) and EXPERT.match(name).group(2) in "23"]
    assert len(unrouted) == 2 * 2 * 3
    for name in unrouted:
        weights = quantized[name]
        assert _on_grid(weights) and weights["weight"].abs().sum() > 0, name
        # round to nearest of the module's own weight: the error is at most half a step
        scale = weights["weight_scale"].repeat_interleave(32, dim=1)
        assert ((weights["weight"] - original[name]).abs() <= scale / 2 + 1e-6).all(), name
    assert sorted(recipe.problems["uncalibrated"]) == sorted(unrouted)
    # one summary at the end names the reason and the count (the first names too)
    (message,) = [m for m in warnings if "QEP" in m]
    (line,) = [line for line in message.splitlines() if "saw no calibration token" in line]
    assert line.startswith("- 12 module(s)") and "model.layers.0.mlp.experts.2.gate_proj" in line
    assert "experts.0." not in line and "experts.1." not in line
    # experts 0 and 1 saw tokens, but the quantized attention routed the two
    # streams differently: those are quantized without correction
    assert set(recipe.problems["unpaired"]) >= {"model.layers.0.mlp.experts.0.gate_proj"}
