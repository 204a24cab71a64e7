"""QEPModifier through llm-compressor's oneshot on tiny random Llamas."""

import functools
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
    # the calibration pass hands later groups' quantized inputs over on the
    # first batch only (before the layer's groups are known; the full-precision
    # re-run comes after that), then the group's replay does
    assert len(seen_q[f"{layer}.mlp.down_proj"]) == 1 + NUM_SAMPLES
    assert len(seen_q[f"{layer}.mlp.up_proj"]) == 1 + NUM_SAMPLES
    assert f"{layer}.mlp.down_proj" not in seen_fp  # never paired
    assert len(seen_fp[f"{layer}.mlp.up_proj"]) == NUM_SAMPLES
    # and the quantized stream it saw last is still what the final model feeds it
    name = f"{layer}.mlp.down_proj"
    final = _inputs_of(quantized_model, [name], torch.tensor(calibration["input_ids"]))
    for sample in range(NUM_SAMPLES):
        torch.testing.assert_close(
            seen_q[name][1 + sample], final[name][sample], rtol=1e-4, atol=1e-5
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


def _count_linear_work(monkeypatch):
    """Count Linear products and Hessian products while a recipe runs."""
    import qep_modifier.modifier as modifier_module
    from llmcompressor.modifiers.gptq import base as gptq_base

    counts = {"forward": 0, "hessian": 0}
    linear = torch.nn.functional.linear
    accumulate = modifier_module.accumulate_hessian

    def counted_linear(*args, **kwargs):
        counts["forward"] += 1
        return linear(*args, **kwargs)

    def counted_accumulate(*args, **kwargs):
        counts["hessian"] += 1
        return accumulate(*args, **kwargs)

    # nn.Linear and the replays' original-weight forward both call it
    monkeypatch.setattr(torch.nn.functional, "linear", counted_linear)
    monkeypatch.setattr(modifier_module, "accumulate_hessian", counted_accumulate)
    monkeypatch.setattr(gptq_base, "accumulate_hessian", counted_accumulate)
    return counts


def _patched_linears(model) -> list[str]:
    """Linears whose forward QEP replaced on the instance and left so."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and isinstance(module.__dict__.get("forward"), functools.partial)
    ]


def test_calibration_work_per_layer_and_batch(model_dir, calibration, monkeypatch):
    # 3 Llama layers (q k v | o | gate up | down), 8 batches; the pipeline
    # never runs lm_head (no target after it)
    counts = _count_linear_work(monkeypatch)
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
    layer_batches = 3 * NUM_SAMPLES

    quantize(model_dir, GPTQModifier(**common), calibration)
    # calibration pass and propagation pass; a Hessian product per Linear
    assert counts == {"forward": (7 + 7) * layer_batches, "hessian": 7 * layer_batches}

    for cache, full_precision_replays in ((True, 0), (False, 3 + 5)):
        counts.update(forward=0, hessian=0)
        model = quantize(model_dir, QEPModifier(cache_full_precision_inputs=cache, **common), calibration)
        assert not _patched_linears(model)  # the skipped Linears compute again
        # calibration pass: the whole layer on a layer's first batch; once its
        # groups are known, only the first group's q k v compute (the pipeline
        # throws the pass's output away); then the full-precision re-run,
        # quantized replays up to o (q k v), up (q k v o gate) and down (all but
        # down: a replay stops before its group's last Linear computes), and the
        # propagation pass. With the cache off, the full-precision stream is
        # replayed up to o and up too (down is not corrected by default)
        per_batch = 7 + (3 + 5 + 6) + full_precision_replays + 7
        first_batches, later_batches = 3, layer_batches - 3
        expected = (7 + per_batch) * first_batches + (3 + per_batch) * later_batches
        assert counts["forward"] == expected, cache
        # one product per distinct input: q k v share one, gate and up one. The
        # calibration pass computes the first group's only (all four on the
        # first batch, before the layer's groups are known); each replay its own
        assert counts["hessian"] == 3 * (4 + (NUM_SAMPLES - 1) + 3 * NUM_SAMPLES), cache


def test_cached_and_recomputed_full_precision_inputs_agree(model_dir, calibration):
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
    cached = quantized_linears(
        quantize(model_dir, QEPModifier(first_order_strength=0.1, **common), calibration)
    )
    recomputed = quantized_linears(
        quantize(
            model_dir,
            QEPModifier(first_order_strength=0.1, cache_full_precision_inputs=False, **common),
            calibration,
        )
    )
    for name in cached:
        for key in cached[name]:
            assert torch.equal(cached[name][key], recomputed[name][key]), (name, key)


def test_propagate_error_false_is_refused(model_dir, calibration):
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
    with pytest.raises(RuntimeError, match="propagate_error=True"):
        quantize(model_dir, recipe, calibration, propagate_error=False)


def test_calibration_pass_computes_everything_for_other_modifiers(model_dir, calibration):
    # QEP's later groups skip computing in the calibration pass only when no
    # other modifier's hook reads what follows them: here GPTQModifier
    # calibrates down_proj in the same pass, after QEP's gate and up
    seen = []

    class Spy(GPTQModifier):
        def calibrate_module(self, module, args, output):
            seen.append(float(args[0].abs().sum()))
            super().calibrate_module(module, args, output)

    weights = group_scheme(3, 32)["group_0"]["weights"]
    qep_targets, spy_targets = ["re:.*(q|k|v|o|gate|up)_proj$"], ["re:.*down_proj$"]
    qep = QEPModifier(
        targets=qep_targets, config_groups={"qep": {"targets": qep_targets, "weights": weights}}
    )
    spy = Spy(targets=spy_targets, config_groups={"gptq": {"targets": spy_targets, "weights": weights}})
    model = quantize(model_dir, [qep, spy], calibration)
    assert len(seen) == 3 * NUM_SAMPLES and all(value > 0 for value in seen)
    assert not _patched_linears(model)


def test_shared_input_written_in_place_is_not_reused(model_dir):
    # q, k and v share one Hessian product per input tensor; a tensor written in
    # place between two modules' hooks must get a fresh product
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    inp = torch.randn(5, 4)
    recipe._accumulate_hessian(first, inp)
    inp.mul_(2.0)
    recipe._accumulate_hessian(second, inp)
    assert torch.allclose(recipe._hessians[second], 4 * recipe._hessians[first])
    recipe._accumulate_hessian(first, inp)  # same tensor, same version: shared
    assert torch.allclose(recipe._hessians[first], recipe._hessians[second] * 5 / 4)
