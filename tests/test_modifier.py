"""QEPModifier through llm-compressor's oneshot on tiny random Llamas."""

from pathlib import Path

import pytest
import torch
from llmcompressor.modifiers.gptq import GPTQModifier

import qep_modifier
from qep_modifier import QEPModifier
from helpers import (
    group_scheme,
    load_model,
    logits,
    quantize,
    quantized_linears,
    save_tiny_llama,
    token_dataset,
)

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, SEQ_LEN = 8, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def calibration():
    return token_dataset(NUM_SAMPLES, SEQ_LEN, seed=1)


@pytest.fixture(scope="module")
def held_out():
    return torch.tensor(token_dataset(4, 48, seed=2)["input_ids"])


@pytest.mark.parametrize(
    "scheme",
    [
        group_scheme(3, 32, actorder="static"),
        group_scheme(4, None, symmetric=False),
        group_scheme(2, 32, actorder="weight"),
    ],
    ids=["w3-g32-static", "w4-channel-asym", "w2-g32-weight"],
)
def test_zero_strength_is_gptq_modifier(model_dir, calibration, scheme):
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=scheme)
    reference = quantized_linears(
        quantize(model_dir, GPTQModifier(**common), calibration)
    )
    ours = quantized_linears(
        quantize(
            model_dir,
            QEPModifier(propagation_strength=0.0, true_sequential=False, **common),
            calibration,
        )
    )
    assert reference.keys() == ours.keys() and len(ours) == 21
    for name in reference:
        for key in reference[name]:
            assert torch.equal(reference[name][key], ours[name][key]), (name, key)


class _RecordingQEP(QEPModifier):
    """Keeps every input pair its hooks hand to the accumulators."""

    def on_initialize(self, state, **kwargs):
        self.__dict__["_seen"] = {"quantized": {}, "full_precision": {}}
        return super().on_initialize(state, **kwargs)

    def _accumulate_hessian(self, module, inp):
        name = self._module_names[module]
        self._seen["quantized"].setdefault(name, []).append(inp.detach().clone())
        super()._accumulate_hessian(module, inp)

    def _accumulate_cross_term(self, module, full_precision_input, quantized_input):
        name = self._module_names[module]
        self._seen["full_precision"].setdefault(name, []).append(
            full_precision_input.detach().clone()
        )
        super()._accumulate_cross_term(module, full_precision_input, quantized_input)


def _inputs_of(model, names, input_ids):
    """What ``model`` feeds each named Linear, one tensor per sample."""
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: captured[name].append(args[0].clone())
        )
        for name in names
    ]
    with torch.no_grad():
        for row in input_ids:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    return captured


def test_streams_are_what_the_fp_and_the_quantized_model_feed(model_dir, calibration):
    recipe = _RecordingQEP(
        targets="Linear",
        ignore=["lm_head"],
        config_groups=group_scheme(3, 32),
        propagation_strength=0.5,  # every Linear corrected, so every X is recorded
        true_sequential=True,
    )
    quantized_model = quantize(model_dir, recipe, calibration)
    input_ids = torch.tensor(calibration["input_ids"])
    names = [
        f"model.layers.2.{part}"
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    full_precision = _inputs_of(load_model(model_dir), names, input_ids)
    final = _inputs_of(quantized_model, names, input_ids)
    for name in names:
        # the last pass over the calibration set is the one the module was
        # quantized with (the within-block replay for later groups)
        seen_fp = recipe._seen["full_precision"][name][-NUM_SAMPLES:]
        seen_q = recipe._seen["quantized"][name][-NUM_SAMPLES:]
        for sample in range(NUM_SAMPLES):
            torch.testing.assert_close(seen_fp[sample], full_precision[name][sample], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(seen_q[sample], final[name][sample], rtol=1e-4, atol=1e-5)
        # a deep layer's two streams really differ
        assert not torch.allclose(seen_fp[0], seen_q[0], atol=1e-3)


def test_uncorrected_group_is_replayed_on_the_quantized_stream_only(model_dir, calibration):
    # default strengths: mlp.down_proj (the last group) is not corrected, so its
    # replay runs the quantized stream only; the groups before it get both
    recipe = _RecordingQEP(
        targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32)
    )
    quantized_model = quantize(model_dir, recipe, calibration)
    seen_fp, seen_q = recipe._seen["full_precision"], recipe._seen["quantized"]
    layer = "model.layers.1"
    # calibration pass + its group's replay
    assert len(seen_q[f"{layer}.mlp.down_proj"]) == 2 * NUM_SAMPLES
    assert len(seen_q[f"{layer}.mlp.up_proj"]) == 2 * NUM_SAMPLES
    assert len(seen_fp[f"{layer}.mlp.down_proj"]) == NUM_SAMPLES  # calibration pass only
    assert len(seen_fp[f"{layer}.mlp.up_proj"]) == 2 * NUM_SAMPLES
    # and the quantized stream it saw last is still what the final model feeds it
    name = f"{layer}.mlp.down_proj"
    final = _inputs_of(quantized_model, [name], torch.tensor(calibration["input_ids"]))
    for sample in range(NUM_SAMPLES):
        torch.testing.assert_close(
            seen_q[name][NUM_SAMPLES + sample], final[name][sample], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("num_bits", [3, 2])
def test_qep_lowers_output_error_against_gptq(model_dir, calibration, held_out, num_bits):
    reference = logits(load_model(model_dir), held_out)
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(num_bits, 32))
    errors = {}
    for label, recipe in {
        "gptq": GPTQModifier(**common),
        "qep": QEPModifier(**common),
    }.items():
        model = quantize(model_dir, recipe, token_dataset(32, SEQ_LEN, seed=1))
        errors[label] = torch.mean((logits(model, held_out) - reference) ** 2).item()
    assert errors["qep"] < errors["gptq"], errors


def test_saved_checkpoint_reloads_with_the_same_logits(model_dir, calibration, held_out, tmp_path):
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(4, 32))
    model = quantize(model_dir, recipe, calibration, output_dir=str(tmp_path / "out"))
    in_memory = logits(model, held_out)
    config = (tmp_path / "out" / "config.json").read_text()
    assert "pack-quantized" in config
    assert "QEPModifier" in (tmp_path / "out" / "recipe.yaml").read_text()
    reloaded = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, held_out), in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "recipe_file",
    sorted(path.name for path in (REPO / "recipes").glob("*.yaml")),
)
def test_recipe_files_run_through_oneshot(model_dir, calibration, recipe_file):
    model = quantize(model_dir, str(REPO / "recipes" / recipe_file), calibration)
    quantized = quantized_linears(model)
    assert len(quantized) == 21
    assert all(torch.isfinite(values["weight"]).all() for values in quantized.values())


def test_disk_offloaded_model_gives_the_same_weights(model_dir, calibration, tmp_path):
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    def recipe():
        return QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))

    plain = quantized_linears(quantize(model_dir, recipe(), calibration))
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, device_map=device_map, offload_folder=str(tmp_path / "disk")
        )
    assert type(model.model.layers[0].self_attn.q_proj._parameters).__name__ == "DiskCache"
    offloaded = quantized_linears(quantize(model, recipe(), calibration))
    assert plain.keys() == offloaded.keys()
    for name in plain:
        for key in plain[name]:
            torch.testing.assert_close(offloaded[name][key], plain[name][key], rtol=0, atol=0)


def test_first_order_strength_switches_to_the_foem_sweep(model_dir, calibration):
    from compressed_tensors.quantization import fake_quantize
    from qep_modifier import FOEMModifier

    common = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
    plain = quantized_linears(quantize(model_dir, QEPModifier(propagation_strength=0.0, **common), calibration))
    foem_model = quantize(model_dir, FOEMModifier(**common), calibration)
    foem = quantized_linears(foem_model)
    same = quantized_linears(
        quantize(model_dir, QEPModifier(propagation_strength=0.0, first_order_strength=0.2, **common), calibration)
    )
    changed = [name for name in plain if not torch.equal(plain[name]["weight"], foem[name]["weight"])]
    assert len(changed) == len(plain)
    for name in foem:
        assert torch.equal(foem[name]["weight"], same[name]["weight"]), name
        module = foem_model.get_submodule(name)
        args = module.quantization_scheme.weights
        regridded = fake_quantize(foem[name]["weight"], foem[name]["weight_scale"], foem[name]["weight_zero_point"], args)
        torch.testing.assert_close(regridded, foem[name]["weight"], rtol=0, atol=1e-6)


def test_error_report_lists_every_module(model_dir, calibration):
    recipe = QEPModifier(
        targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32), report_errors=True
    )
    quantize(model_dir, recipe, calibration)
    report = {row["name"]: row for row in recipe.error_report}
    assert len(report) == 21
    for name, row in report.items():
        assert 0.0 <= row["quantized"] < 10 and 0.0 <= row["before"] < 10
        if name.endswith("down_proj"):
            assert row["corrected"] is None  # strength 0 by default
        else:
            # the damped correction minimises ||W X - V X~||^2 + l ||V - W||^2:
            # any strength in [0, 1] can only lower the output error
            assert row["corrected"] <= row["before"] + 1e-9, name
    # the first layer's inputs agree in both streams; deeper ones do not
    assert report["model.layers.0.self_attn.q_proj"]["before"] == pytest.approx(0.0, abs=1e-6)
    assert report["model.layers.2.self_attn.q_proj"]["before"] > 0.01
    assert report["model.layers.2.self_attn.q_proj"]["corrected"] < report["model.layers.2.self_attn.q_proj"]["before"]
