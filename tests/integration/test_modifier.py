"""QEPModifier through llm-compressor's oneshot on tiny random Llamas."""

import functools
import re

import pytest
import torch
from llmcompressor.modifiers.gptq import GPTQModifier

import qep_modifier.calibrate as calibrate_module
from qep_modifier import FOEMModifier, QEPModifier
from tests.conftest import NUM_SAMPLES, SEQ_LEN
from tests.models import (
    REPO,
    assert_reloads_packed,
    group_scheme,
    inputs_of,
    load_model,
    logits,
    quantize,
    quantized_linears,
    token_dataset,
)

W3 = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))


def _assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys() and first
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)


@pytest.mark.parametrize(
    "scheme",
    [
        group_scheme(3, 32, actorder="static"),
        group_scheme(4, None, symmetric=False),
        group_scheme(2, 32, actorder="weight"),
    ],
    ids=["w3-g32-static", "w4-channel-asym", "w2-g32-weight"],
)
def test_zero_strength_is_gptq_modifier(tiny_llama, calibration, scheme):
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=scheme)
    reference = quantized_linears(quantize(tiny_llama, GPTQModifier(**common), calibration))
    ours = quantized_linears(
        quantize(
            tiny_llama,
            QEPModifier(propagation_strength=0.0, true_sequential=False, **common),
            calibration,
        )
    )
    assert len(ours) == 21
    _assert_same_weights(reference, ours)


@pytest.fixture
def accumulated(monkeypatch):
    """Every batch the modifier accumulates: module names -> (X~ list, X list or None)."""
    seen = []
    accumulate = calibrate_module.accumulate_batch

    def recording(statistics, quantized, full_precision=None):
        seen.append(
            {
                module: (
                    [x.clone() for x in quantized.get(module, ())],
                    None
                    if full_precision is None
                    else [x.clone() for x in full_precision.get(module, ())],
                )
                for module in statistics
            }
        )
        accumulate(statistics, quantized, full_precision)

    monkeypatch.setattr(calibrate_module, "accumulate_batch", recording)
    return seen


def _by_name(model, seen):
    names = {module: name for name, module in model.named_modules()}
    by_name = {}
    for batch in seen:
        for module, inputs in batch.items():
            by_name.setdefault(names[module], []).append(inputs)
    return by_name


def test_streams_are_what_the_fp_and_the_quantized_model_feed(
    tiny_llama, calibration, accumulated
):
    recipe = QEPModifier(propagation_strength=0.5, **W3)  # every Linear corrected
    quantized_model = quantize(tiny_llama, recipe, calibration)
    seen = _by_name(quantized_model, accumulated)
    input_ids = torch.tensor(calibration["input_ids"])
    names = [
        f"model.layers.2.{part}"
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    full_precision = inputs_of(load_model(tiny_llama), names, input_ids)
    final = inputs_of(quantized_model, names, input_ids)
    for name in names:
        # each module is accumulated once per batch: from its group's replay
        assert len(seen[name]) == NUM_SAMPLES
        for sample, (quantized_inputs, full_precision_inputs) in enumerate(seen[name]):
            (x_q,), (x,) = quantized_inputs, full_precision_inputs
            torch.testing.assert_close(x, full_precision[name][sample], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x_q, final[name][sample], rtol=1e-4, atol=1e-5)
        # a deep layer's two streams really differ
        assert not torch.allclose(seen[name][0][0][0], seen[name][0][1][0], atol=1e-3)


def test_uncorrected_group_is_replayed_on_the_quantized_stream_only(
    tiny_llama, calibration, accumulated
):
    # default strengths: mlp.down_proj (the last group) is not corrected, so its
    # replay runs the quantized stream only; the groups before it get both
    quantized_model = quantize(tiny_llama, QEPModifier(**W3), calibration)
    seen = _by_name(quantized_model, accumulated)
    layer = "model.layers.1"
    assert len(seen[f"{layer}.mlp.down_proj"]) == NUM_SAMPLES
    assert all(full is None for _, full in seen[f"{layer}.mlp.down_proj"])
    assert all(len(full) == 1 for _, full in seen[f"{layer}.mlp.up_proj"])
    name = f"{layer}.mlp.down_proj"
    final = inputs_of(quantized_model, [name], torch.tensor(calibration["input_ids"]))
    for sample, (quantized_inputs, _) in enumerate(seen[name]):
        torch.testing.assert_close(quantized_inputs[0], final[name][sample], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_bits", [3, 2])
def test_qep_lowers_output_error_against_gptq(tiny_llama, held_out, num_bits):
    reference = logits(load_model(tiny_llama), held_out)
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(num_bits, 32))
    errors = {}
    for label, recipe in {"gptq": GPTQModifier(**common), "qep": QEPModifier(**common)}.items():
        model = quantize(tiny_llama, recipe, token_dataset(32, SEQ_LEN, seed=1))
        errors[label] = torch.mean((logits(model, held_out) - reference) ** 2).item()
    assert errors["qep"] < errors["gptq"], errors


def test_saved_checkpoint_reloads_with_the_same_logits(tiny_llama, calibration, held_out, tmp_path):
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(4, 32))
    model = quantize(tiny_llama, recipe, calibration, output_dir=str(tmp_path / "out"))
    in_memory = logits(model, held_out)
    config = (tmp_path / "out" / "config.json").read_text()
    assert "pack-quantized" in config
    assert "QEPModifier" in (tmp_path / "out" / "recipe.yaml").read_text()
    reloaded = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, held_out), in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "recipe_file", sorted(path.name for path in (REPO / "recipes").glob("*.yaml"))
)
def test_recipe_files_run_through_oneshot(tiny_llama, calibration, recipe_file):
    model = quantize(tiny_llama, str(REPO / "recipes" / recipe_file), calibration)
    quantized = quantized_linears(model)
    assert len(quantized) == 21
    assert all(torch.isfinite(values["weight"]).all() for values in quantized.values())


def test_disk_offloaded_model_gives_the_same_weights(tiny_llama, calibration, tmp_path):
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    plain = quantized_linears(quantize(tiny_llama, QEPModifier(**W3), calibration))
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
            tiny_llama, device_map=device_map, offload_folder=str(tmp_path / "disk")
        )
    assert type(model.model.layers[0].self_attn.q_proj._parameters).__name__ == "DiskCache"
    _assert_same_weights(plain, quantized_linears(quantize(model, QEPModifier(**W3), calibration)))


def test_first_order_strength_switches_to_the_foem_sweep(tiny_llama, calibration):
    from compressed_tensors.quantization import fake_quantize

    plain = quantized_linears(
        quantize(tiny_llama, QEPModifier(propagation_strength=0.0, **W3), calibration)
    )
    foem_model = quantize(tiny_llama, FOEMModifier(**W3), calibration)
    foem = quantized_linears(foem_model)
    same = quantized_linears(
        quantize(
            tiny_llama,
            QEPModifier(propagation_strength=0.0, first_order_strength=0.2, **W3),
            calibration,
        )
    )
    changed = [name for name in plain if not torch.equal(plain[name]["weight"], foem[name]["weight"])]
    assert len(changed) == len(plain)
    _assert_same_weights(foem, same)
    for name in foem:
        args = foem_model.get_submodule(name).quantization_scheme.weights
        values = foem[name]
        regridded = fake_quantize(values["weight"], values["weight_scale"], values["weight_zero_point"], args)
        torch.testing.assert_close(regridded, values["weight"], rtol=0, atol=1e-6)


def test_error_report_lists_every_module(tiny_llama, calibration):
    recipe = QEPModifier(report_errors=True, **W3)
    quantize(tiny_llama, recipe, calibration)
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
    deep = report["model.layers.2.self_attn.q_proj"]
    assert deep["before"] > 0.01 and deep["corrected"] < deep["before"]


def test_refit_scales_lower_the_first_layers_error_and_the_checkpoint_reloads(
    tiny_llama, calibration, held_out, tmp_path
):
    from safetensors.torch import load_file

    scheme = group_scheme(2, 32, symmetric=False, actorder="static")
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=scheme, report_errors=True)
    plain = QEPModifier(**common)
    plain_weights = quantized_linears(quantize(tiny_llama, plain, calibration))
    refit = QEPModifier(refit_scales=2, **common)
    model = quantize(tiny_llama, refit, calibration, output_dir=str(tmp_path / "out"))
    saved = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        saved.update(load_file(shard))
    errors = {
        label: {row["name"]: row["quantized"] for row in recipe.error_report}
        for label, recipe in (("plain", plain), ("refit", refit))
    }
    # layer 0's q/k/v see the same inputs in both runs and both streams, where the
    # refit's objective is the reported output error (up to the sweep's damping)
    for role in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{role}"
        assert errors["refit"][name] < errors["plain"][name], name
        scales = saved[f"{name}.weight_scale"]
        assert scales.shape == plain_weights[name]["weight_scale"].shape
        assert not torch.equal(scales, plain_weights[name]["weight_scale"].to(scales.dtype))
    reloaded = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, held_out), logits(model, held_out), rtol=1e-4, atol=1e-4)


def test_block_tuning_lowers_the_output_error_holds_the_codes_and_reloads(
    tiny_llama, calibration, held_out, tmp_path
):
    scheme = group_scheme(2, 32, symmetric=False, actorder="static")
    common = dict(targets="Linear", ignore=["lm_head"], config_groups=scheme)
    plain_model = quantize(tiny_llama, QEPModifier(**common), calibration)
    plain = quantized_linears(plain_model)
    tuned_recipe = QEPModifier(block_tuning_epochs=3, block_tuning_learning_rate=0.01, **common)
    model = quantize(tiny_llama, tuned_recipe, calibration)
    tuned = quantized_linears(model)
    # closer to the full-precision model, on the calibration tokens (its objective:
    # 0.158 -> 0.120 when written) and on held-out ones (0.734 -> 0.663)
    full_precision = load_model(tiny_llama)
    calibration_ids = torch.tensor(calibration["input_ids"])
    for ids, ratio in ((calibration_ids, 0.85), (held_out, 0.95)):
        reference = logits(full_precision, ids)
        error = {
            label: ((logits(m, ids) - reference).norm() / reference.norm()).item()
            for label, m in (("plain", plain_model), ("tuned", model))
        }
        assert error["tuned"] < ratio * error["plain"], error
    # layer 0 is quantized from the same inputs in both runs: same integer codes
    # and zero points, other scales
    for role in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.0.{role}"
        zero_point = plain[name]["weight_zero_point"]
        assert torch.equal(tuned[name]["weight_zero_point"], zero_point)
        groups = torch.arange(tuned[name]["weight"].shape[1]) // 32
        codes = {
            label: weights[name]["weight"] / weights[name]["weight_scale"][:, groups] + zero_point[:, groups]
            for label, weights in (("plain", plain), ("tuned", tuned))
        }
        assert torch.equal(codes["tuned"].round(), codes["plain"].round())
        assert not torch.equal(tuned[name]["weight_scale"], plain[name]["weight_scale"])
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, plain_model.model.layers[0].input_layernorm.weight)
    assert_reloads_packed(model, tmp_path / "out", held_out)


def test_block_tuning_moves_the_codes_on_their_grid_and_reloads(one_layer_llama, calibration, held_out, tmp_path):
    """``block_tuning_code_learning_rate``: every Linear's integer codes move
    from GPTQ's (those the held-codes run keeps), stay integers in the 3-bit
    range, the logits come closer to the full-precision model's than with the
    codes held, and the compressed checkpoint reloads to the same logits."""
    common = dict(
        targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32, actorder="static"),
        block_tuning_epochs=4, block_tuning_learning_rate=0.01,
    )
    held_model = quantize(one_layer_llama, QEPModifier(**common), calibration)
    held = quantized_linears(held_model)
    model = quantize(one_layer_llama, QEPModifier(block_tuning_code_learning_rate=0.005, **common), calibration)
    moved = quantized_linears(model)
    assert len(moved) == 7
    for name in moved:
        codes = {}
        for label, weights in (("held", held), ("moved", moved)):
            groups = torch.arange(weights[name]["weight"].shape[1]) // 32
            unrounded = weights[name]["weight"] / weights[name]["weight_scale"][:, groups]
            codes[label] = unrounded.round()
            assert (unrounded - codes[label]).abs().max() < 1e-3, (label, name)  # on the grid
            assert codes[label].min() >= -4 and codes[label].max() <= 3, (label, name)
        changed = (codes["moved"] != codes["held"]).float().mean().item()
        assert 0 < changed < 0.1, (name, changed)  # 0.5% to 2% when written
    full_precision = load_model(one_layer_llama)
    calibration_ids = torch.tensor(calibration["input_ids"])
    for ids in (calibration_ids, held_out):
        reference = logits(full_precision, ids)
        error = {
            label: ((logits(m, ids) - reference).norm() / reference.norm()).item()
            for label, m in (("held", held_model), ("moved", model))
        }
        assert error["moved"] < error["held"], error  # 0.0826 -> 0.0805, held out 0.1922 -> 0.1909
    expected = logits(model, held_out)
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    reloaded = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, held_out), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "fields",
    [
        {"cache_full_precision_inputs": False},
        {"resume_replays": False},
        {"cache_full_precision_inputs": False, "resume_replays": False},
    ],
    ids=["cache-off", "resume-off", "both-off"],
)
def test_memory_options_change_no_weight(tiny_llama, calibration, fields):
    common = dict(first_order_strength=0.1, report_errors=True, **W3)
    reference_recipe = QEPModifier(**common)
    reference = quantized_linears(quantize(tiny_llama, reference_recipe, calibration))
    recipe = QEPModifier(**fields, **common)
    _assert_same_weights(reference, quantized_linears(quantize(tiny_llama, recipe, calibration)))
    assert recipe.error_report == reference_recipe.error_report


@pytest.mark.parametrize("why", ["the MLP returns a new tensor", "the resumed output is not the whole one"])
def test_propagation_runs_whole_where_it_cannot_be_resumed(tiny_llama, calibration, monkeypatch, why):
    """The pipeline's propagation pass resumes from the last replay only where
    batch 0 shows it is the same computation: the MLP returns its down_proj's
    output as it is, and the resumed output equals the whole forward bit for
    bit. Otherwise the pass runs whole, and the weights are those of QEP
    without resumed replays."""
    import qep_modifier.propagation as propagation
    from transformers.models.llama import modeling_llama

    if why == "the MLP returns a new tensor":
        mlp_forward = modeling_llama.LlamaMLP.forward
        monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: mlp_forward(self, x) * 1.0)
    else:
        monkeypatch.setattr(propagation, "same_output", lambda a, b: False)
    whole = quantized_linears(quantize(tiny_llama, QEPModifier(resume_replays=False, **W3), calibration))
    counts = _count_work(monkeypatch)
    resumed = quantized_linears(quantize(tiny_llama, QEPModifier(**W3), calibration))
    _assert_same_weights(whole, resumed)
    # as in test_calibration_work_per_layer_and_batch's defaults (the probe of
    # batch 0 with and without the attention probabilities: 14 per layer), with
    # batch 0's whole forward (7 per layer; then its resumed one, 1, where the
    # MLP passed) and the pipeline's whole pass (7 per batch)
    checked = 7 + (why == "the resumed output is not the whole one")
    expected = 3 * (7 + 7 + 14 + checked) + NUM_SAMPLES * (2 * (7 + 6 + 7) + (4 + 6 + 7))
    assert counts["linear"] == expected, counts


def test_two_layers_per_subgraph_give_the_same_weights(tiny_llama, calibration):
    # the second layer of a subgraph gets its quantized-stream input from QEP's
    # own propagation through the first, exactly what the pipeline computes
    one = quantized_linears(quantize(tiny_llama, QEPModifier(**W3), calibration))
    two = quantized_linears(
        quantize(tiny_llama, QEPModifier(**W3), calibration, sequential_targets_per_subgraph=2)
    )
    _assert_same_weights(one, two)


def _count_work(monkeypatch):
    """Count Linear products, Hessian products and attention passes."""
    import qep_modifier.statistics as statistics_module
    from llmcompressor.modifiers.gptq import base as gptq_base
    from transformers.models.llama import modeling_llama

    counts = {"linear": 0, "hessian": 0, "attention": 0}

    def counted(key, function):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return wrapper

    # nn.Linear and the replays' original-weight forward both call it
    monkeypatch.setattr(torch.nn.functional, "linear", counted("linear", torch.nn.functional.linear))
    hessian = counted("hessian", gptq_base.accumulate_hessian)
    monkeypatch.setattr(statistics_module, "accumulate_hessian", hessian)
    monkeypatch.setattr(gptq_base, "accumulate_hessian", hessian)
    attention = counted("attention", modeling_llama.eager_attention_forward)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", attention)
    return counts


def test_calibration_work_per_layer_and_batch(tiny_llama, calibration, monkeypatch):
    # 3 Llama layers (q k v | o | gate up | down), 8 batches; the pipeline
    # never runs lm_head (no target after it)
    counts = _count_work(monkeypatch)
    layer_batches = 3 * NUM_SAMPLES

    quantize(tiny_llama, GPTQModifier(**W3), calibration)
    # calibration pass and propagation pass; a Hessian product per Linear
    assert counts == {"linear": 14 * layer_batches, "hessian": 7 * layer_batches, "attention": 2 * layer_batches}

    # QEP per layer and batch: the full-precision pass (7 products; the last
    # layer's stops before gate: nothing reads its output or the MLP's), the
    # quantized-stream replays up to o (q k v), up to gate (o on its input kept
    # from the replay before stands for the attention block, its probabilities
    # dropped) and up to down (gate and up: the attention block kept whole), and
    # the pipeline's propagation pass:
    # down on its input kept from the last replay (1; the attention block kept),
    # batch 0 also whole to check it (7 + 1 attention per layer). Per layer, two
    # whole forwards of batch 0 check that the layer reads only the attention
    # block's output (14 + 2), the calibration pass computes its first batch
    # only, and QEP traces each layer once (7 + 7). Without kept outputs
    # (resume_replays off) the replays recompute q k v twice and o once more,
    # the attention every time, and the propagation pass runs whole (7); without
    # the cached full-precision inputs the full-precision stream is replayed up
    # to o and up to gate (3 + 4) and the last layer's pass is not run at all.
    cases = {
        "defaults": ({}, 3 + 1 + 2, 1 + 0 + 0, 0, 0, 1, 0),
        "resume off": ({"resume_replays": False}, 3 + 4 + 6, 1 + 1 + 1, 0, 0, 7, 1),
        "cache off": ({"cache_full_precision_inputs": False}, 3 + 1 + 2, 1 + 0 + 0, 3 + 4, 2, 1, 0),
    }
    for label, case in cases.items():
        fields, replays, replay_attention, fp_replays, fp_replay_attention, propagation, propagation_attention = case
        counts.update(linear=0, hessian=0, attention=0)
        quantize(tiny_llama, QEPModifier(**fields, **W3), calibration)
        resumed = fields.get("resume_replays", True)
        check = 7 if propagation == 1 else 0  # batch 0's whole forward beside the resumed one
        first_only_check = 14 if resumed else 0  # batch 0 with and without the probabilities
        per_layer = 7 + 7 + check + first_only_check  # the calibration pass's first batch, the trace
        last_fp = 0 if fields.get("cache_full_precision_inputs") is False else 4
        expected_linear = 3 * per_layer + NUM_SAMPLES * (
            2 * (7 + replays + fp_replays + propagation) + (last_fp + replays + fp_replays + propagation)
        )
        last_fp_attention = 0 if last_fp == 0 else 1
        expected_attention = 3 * (2 + (check + first_only_check) // 7) + NUM_SAMPLES * (
            2 * (1 + replay_attention + fp_replay_attention + propagation_attention)
            + (last_fp_attention + replay_attention + fp_replay_attention + propagation_attention)
        )
        assert counts["linear"] == expected_linear, (label, counts)
        assert counts["attention"] == expected_attention, (label, counts)
        # one H~ product per distinct input: q k v share one, gate and up one
        assert counts["hessian"] == 4 * layer_batches, (label, counts)


def test_propagate_error_false_is_refused(tiny_llama, calibration):
    with pytest.raises(RuntimeError, match="propagate_error=True"):
        quantize(tiny_llama, QEPModifier(**W3), calibration, propagate_error=False)


def test_propagate_error_false_is_refused_without_the_full_precision_stream(
    tiny_llama, calibration
):
    # FOEM alone runs no full-precision stream; the skipped calibration pass
    # hands a layer's input on unchanged, which the next layer notices
    with pytest.raises(RuntimeError, match="propagate_error=True"):
        quantize(tiny_llama, FOEMModifier(**W3), calibration, propagate_error=False)


def _real_forwards(model) -> bool:
    """No layer's forward is swapped for the skipping one any more."""
    return not any(
        isinstance(layer.__dict__.get("forward"), functools.partial)
        for layer in model.model.layers
    )


def test_nothing_is_left_swapped_or_silenced(tiny_llama, calibration):
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    model = quantize(tiny_llama, QEPModifier(**W3), calibration)
    assert _real_forwards(model)
    assert not HooksMixin._HOOKS_DISABLED and not HooksMixin._HOOKS_KEEP_ENABLED
    # a refusal part way leaves the model's layers computing for real too
    model = load_model(tiny_llama)
    with pytest.raises(RuntimeError, match="propagate_error=True"):
        quantize(model, QEPModifier(**W3), calibration, propagate_error=False)
    assert _real_forwards(model)


def test_auto_strength_chooses_per_module_from_held_out_batches(tiny_llama, calibration, warnings):
    from qep_modifier.correction import AUTO_CANDIDATES

    recipe = QEPModifier(propagation_strength={r"down_proj$": 0.0, "default": "auto"}, **W3)
    model = quantize(tiny_llama, recipe, calibration)
    chosen = recipe.chosen_strengths
    corrected = [name for name in quantized_linears(model) if not name.endswith("down_proj")]
    assert sorted(chosen) == sorted(corrected)
    assert set(chosen.values()) <= set(AUTO_CANDIDATES)
    # the same strengths given by hand give the same weights: auto only chooses
    by_hand = {re.escape(name) + "$": value for name, value in chosen.items()}
    fixed = QEPModifier(propagation_strength={**by_hand, "default": 0.0}, **W3)
    _assert_same_weights(quantized_linears(model), quantized_linears(quantize(tiny_llama, fixed, calibration)))
    assert not any("auto needs" in message for message in warnings)


def test_auto_strength_with_one_batch_falls_back_with_a_warning(tiny_llama, warnings):
    recipe = QEPModifier(propagation_strength="auto", **W3)
    quantize(tiny_llama, recipe, token_dataset(1, 64, seed=1))
    assert set(recipe.chosen_strengths.values()) == {0.5}
    assert any("auto needs calibration batches on both sides" in message for message in warnings)
