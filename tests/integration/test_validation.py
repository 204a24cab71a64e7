"""Bad recipes fail early, with the field and the allowed values in the message."""

import math

import pytest
import torch
from pydantic import ValidationError

from qep_modifier import FOEMModifier, QEPModifier
from tests.models import group_scheme, load_model, quantize, save_tiny_llama, token_dataset


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"propagation_strength": 1.5}, ["propagation_strength", "[0, 1]"]),
        ({"propagation_strength": -0.1}, ["propagation_strength", "[0, 1]"]),
        ({"propagation_strength": {"q_proj": 2.0}}, ["propagation_strength['q_proj']", "[0, 1]"]),
        ({"propagation_strength": {"(unclosed": 0.5}}, ["(unclosed", "regular expression"]),
        ({"propagation_strength": {"q_proj": "high"}}, ["propagation_strength['q_proj']", "number"]),
        ({"correction_damping": 0.0}, ["correction_damping", "> 0"]),
        ({"correction_damping": -1.0}, ["correction_damping", "> 0"]),
        ({"first_order_strength": -0.1}, ["first_order_strength", ">= 0"]),
        ({"first_order_reach": "some"}, ["first_order_reach", "next", "all"]),
        ({"base": "awq"}, ["base", "gptq", "rtn"]),
        ({"refit_scales": -1}, ["refit_scales", "whole number >= 0"]),
        ({"refit_scales": True}, ["refit_scales", "whole number >= 0"]),
        ({"refit_scales": 1.5}, ["refit_scales", "whole number >= 0"]),
        ({"block_tuning_epochs": -1}, ["block_tuning_epochs", "whole number >= 0"]),
        ({"block_tuning_epochs": 2.5}, ["block_tuning_epochs", "whole number >= 0"]),
        ({"block_tuning_learning_rate": 0.0}, ["block_tuning_learning_rate", "> 0"]),
        ({"block_tuning_code_learning_rate": -0.1}, ["block_tuning_code_learning_rate", ">= 0"]),
        ({"unknown_field": 1}, ["unknown_field"]),
    ],
)
def test_bad_fields_are_rejected_on_construction(fields, words):
    with pytest.raises((ValueError, ValidationError)) as error:
        QEPModifier(targets="Linear", scheme="W4A16", **fields)
    for word in words:
        assert word in str(error.value)


def test_foem_alias_defaults():
    foem = FOEMModifier(targets="Linear", scheme="W4A16")
    assert foem.propagation_strength == 0.0 and foem.first_order_strength == 0.2
    assert foem.first_order_reach == "next"


@pytest.fixture
def model_dir(one_layer_llama):
    return one_layer_llama


@pytest.mark.parametrize(
    "scheme, words",
    [
        ("W8A8", ["weight-only", "activation"]),
        ("FP8", ["weight-only"]),
        ("NVFP4A16", ["integers only", "'int'"]),
    ],
)
def test_non_integer_or_activation_schemes_fail_before_calibration(model_dir, scheme, words):
    untouched = load_model(model_dir).state_dict()
    with pytest.raises(ValueError) as error:  # when the recipe is parsed
        recipe = QEPModifier(targets="Linear", ignore=["lm_head"], scheme=scheme)
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))
    for word in words:
        assert word in str(error.value)
    # nothing on disk changed
    for name, value in load_model(model_dir).state_dict().items():
        assert torch.equal(value, untouched[name]), name


TENSOR_SCALES = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "tensor"}}}


@pytest.mark.parametrize(
    "fields, scheme, words",
    [
        ({"refit_scales": 1, "base": "rtn"}, group_scheme(3, 32), ["refit_scales", "base: gptq"]),
        (
            {"refit_scales": 1, "group_scales": "sweep"},
            group_scheme(3, 32),
            ["refit_scales", "group_scales: observer"],
        ),
        ({"refit_scales": 1}, TENSOR_SCALES, ["refit_scales", "group or channel strategy", "'tensor'"]),
        ({"block_tuning_epochs": 1}, TENSOR_SCALES, ["block_tuning_epochs", "group or channel scales", "'tensor'"]),
        (
            {"block_tuning_code_learning_rate": 0.005},
            group_scheme(3, 32),
            ["block_tuning_code_learning_rate", "block_tuning_epochs >= 1", "block_tuning_epochs: 0"],
        ),
        (
            {"block_tuning_code_learning_rate": 0.005, "block_tuning_epochs": 1, "base": "rtn"},
            group_scheme(3, 32),
            ["block_tuning_code_learning_rate", "base: gptq", "base: rtn"],
        ),
        (
            {"block_tuning_code_learning_rate": 0.005, "block_tuning_epochs": 1, "group_scales": "sweep"},
            group_scheme(3, 32),
            ["block_tuning_code_learning_rate", "group_scales: observer", "group_scales: sweep"],
        ),
    ],
    ids=[
        "refit-rtn", "refit-sweep-scales", "refit-tensor", "tuning-tensor",
        "codes-no-tuning", "codes-rtn", "codes-sweep-scales",
    ],
)
def test_scale_fields_that_cannot_apply_fail_before_calibration(model_dir, fields, scheme, words):
    with pytest.raises(ValidationError) as error:  # when the recipe is parsed
        recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=scheme, **fields)
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))
    message = error.value.errors()[0]["msg"]
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message


def test_unmatched_strength_pattern_warns(model_dir, caplog):
    from loguru import logger

    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        recipe = QEPModifier(
            targets="Linear",
            ignore=["lm_head"],
            config_groups=group_scheme(4, 32),
            propagation_strength={"no_such_module": 0.3, "default": 0.5},
        )
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))
    finally:
        logger.remove(sink)
    assert any("'no_such_module'" in message and "match no target" in message for message in messages)


@pytest.mark.parametrize(
    "hidden, group_size, words",
    [
        # the toolkit's own check would list every module; QEP's names the widths
        (96, 64, ["group_size 64 does not divide the input width 96", "group sizes that fit every targeted module: 32"]),
        (64, 128, ["group_size 128 does not divide the input width 64", "fit every targeted module: 32, 64"]),
    ],
)
def test_group_size_that_does_not_divide_names_the_module(tmp_path, hidden, group_size, words):
    model_dir = save_tiny_llama(
        tmp_path / "odd", num_hidden_layers=1, hidden_size=hidden, intermediate_size=2 * hidden
    )
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(4, group_size))
    with pytest.raises(ValueError) as error:
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj" in message and "strategy: channel" in message
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message


def test_too_small_calibration_set_warns(model_dir):
    from loguru import logger

    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(4, 32))
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))  # 32 tokens < 256 wide
    finally:
        logger.remove(sink)
    assert any("32 tokens" in message and "rank-deficient" in message for message in messages)


def _recipe_file(path, fields: dict):
    import yaml

    qep = {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": "W4A16", **fields}
    path.write_text(yaml.safe_dump({"quant_stage": {"quant_modifiers": {"QEPModifier": qep}}}))
    return path


ONE_GROUP = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}}


def _bits(num_bits):
    return {"scheme": None, "config_groups": {"group_0": {**ONE_GROUP, "weights": {**ONE_GROUP["weights"], "num_bits": num_bits}}}}


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"block_tuning_learning_rate": math.inf}, ["block_tuning_learning_rate", "finite", "inf"]),
        ({"block_tuning_learning_rate": math.nan}, ["block_tuning_learning_rate", "finite", "nan"]),
        ({"correction_damping": math.inf}, ["correction_damping", "finite"]),
        ({"first_order_strength": math.inf}, ["first_order_strength", "finite"]),
        ({"first_order_strength": math.nan}, ["first_order_strength", "finite"]),
        ({"block_tuning_code_learning_rate": math.inf}, ["block_tuning_code_learning_rate", "finite", ">= 0"]),
        ({"propagation_strength": math.nan}, ["propagation_strength", "[0, 1]"]),
        ({"dampening_frac": -1}, ["dampening_frac", ">= 0", "-1"]),
        ({"dampening_frac": math.inf}, ["dampening_frac", "finite"]),
        ({"dampening_frac": None}, ["dampening_frac", ">= 0", "None"]),
        ({"block_size": 0}, ["block_size", ">= 1"]),
        ({"block_size": True}, ["block_size", ">= 1"]),
        (_bits(0), ["config_groups.group_0", "num_bits = 0", "2-8"]),
        (_bits(1), ["num_bits = 1", "2-8"]),
        (_bits(9), ["num_bits = 9", "2-8"]),
        ({"config_groups": {"group_0": ONE_GROUP}}, ["scheme", "config_groups", "give one"]),
        ({"scheme": "FP8"}, ["scheme 'FP8'", "weight-only"]),
        ({"scheme": "W4A8"}, ["scheme 'W4A8'", "weight-only", "activations"]),
        (
            {"scheme": None, "config_groups": {"group_0": {**ONE_GROUP, "input_activations": {"num_bits": 8}}}},
            ["config_groups.group_0", "weight-only"],
        ),
        ({"scheme": "NVFP4A16"}, ["scheme 'NVFP4A16'", "integers only", "'int'"]),
        ({"weight_observer": "memoryless_msee"}, ["weight_observer", "'memoryless_msee'", "did you mean 'memoryless_mse'"]),
        ({"stream_offload_device": "gpu0"}, ["stream_offload_device", "'gpu0'", "cpu"]),
        ({"refit_scales": 1, "base": "rtn"}, ["refit_scales", "base: gptq"]),
        ({"block_tuning_epochs": 1, "scheme": None, "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "tensor"}}}}, ["block_tuning_epochs", "config_groups.group_0", "'tensor'"]),
        ({"batch_quantization": 2}, ["'batch_quantization'", "did you mean 'batched_quantization'"]),
    ],
)
def test_every_bad_field_fails_in_one_line_when_the_recipe_is_read(tmp_path, fields, words):
    from qep_modifier.workflow import InputError, load_recipe

    path = _recipe_file(tmp_path / "recipe.yaml", fields)
    with pytest.raises(InputError) as error:
        load_recipe(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"recipe {path}")
    for word in words:
        assert word in message, message


def test_the_field_list_is_the_fields_a_recipe_can_set():
    with pytest.raises(ValidationError) as error:
        QEPModifier(targets="Linear", scheme="W4A16", observers={"weights": "mse"})
    message = error.value.errors()[0]["msg"]
    assert "did you mean 'observer'" in message
    listed = message.split("its fields: ")[1].split(", ")
    for field in ("batched_quantization", "observer", "kv_cache_scheme", "block_tuning_epochs", "report_errors"):
        assert field in listed
    for internal in ("index", "start", "initialized_", "requires_calibration_data"):
        assert internal not in listed
    assert set(listed) <= set(QEPModifier.model_fields)


NO_MATCH = [
    ({"targets": ["re:.*no_such_proj$"]}, "targets ['re:.*no_such_proj$'] with ignore ['lm_head']"),
    ({"targets": ["Linear"], "ignore": ["Linear"]}, "targets ['Linear'] with ignore ['Linear']"),
]


@pytest.mark.parametrize("fields, words", NO_MATCH, ids=["no-target", "all-ignored"])
def test_targets_that_match_no_module_are_refused_before_loading(fields, words):
    from types import SimpleNamespace

    from qep_modifier.workflow import InputError, check_recipe_fits
    from tests.models import tiny_llama_config

    recipe = SimpleNamespace(modifiers=[QEPModifier(**{"ignore": ["lm_head"], "scheme": "W4A16", **fields})])
    with pytest.raises(InputError) as error:
        check_recipe_fits(tiny_llama_config(num_hidden_layers=1), recipe)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert words in message and "match no module" in message and "model.layers.0.self_attn.q_proj" in message


def test_targets_that_match_no_module_fail_before_calibration(model_dir, monkeypatch):
    def calibrating(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(QEPModifier, "on_calibration_start", calibrating)
    recipe = QEPModifier(targets=["re:.*no_such_proj$"], ignore=["lm_head"], scheme="W4A16")
    with pytest.raises(ValueError, match=r"targets \['re:.\*no_such_proj\$'\] with ignore \['lm_head'\] match no module"):
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))


def test_spinquant_on_a_model_type_it_does_not_support_is_refused_before_loading(tmp_path, capsys):
    from transformers import AutoConfig

    from qep_modifier.cli import oneshot_main
    from qep_modifier.workflow import check_recipe_fits, load_recipe
    from tests.models import tiny_llama_config, word_level_tokenizer

    # a model folder with a config and a tokenizer and no weights: nothing to load
    folder = tmp_path / "gemma3"
    AutoConfig.for_model(
        "gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ).save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{3 + i % 200}" for i in range(200)) + "\n")
    with pytest.raises(SystemExit) as stop:
        oneshot_main(
            [
                "--model", str(folder), "--recipe", "w3a16_spinquant_qep", "--dataset", str(text),
                "--num-samples", "2", "--seq-len", "16", "--output", str(tmp_path / "out"),
            ]
        )
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1
    assert message.startswith("qep-oneshot: SpinQuantModifier does not support model type gemma3_text")
    assert "scaled word embedding" in message
    assert "use the packaged recipe w3a16_values_qep (an exact value rotation only) instead" in message
    assert not (tmp_path / "out").exists()
    # a family its rotations were checked on passes
    check_recipe_fits(tiny_llama_config(num_hidden_layers=1), load_recipe("w3a16_spinquant_qep"))


def test_spinquant_mappings_of_the_recipe_do_not_lift_the_refusal():
    # llm-compressor 0.14.0.1's SpinQuantModifier.on_initialize replaces a recipe's own
    # mappings with the ones it infers from the model's class (it keeps them only when
    # a transform_config is given), so mappings alone must not let gemma3 through
    from types import SimpleNamespace

    from llmcompressor.modifiers.transform import SpinQuantModifier
    from llmcompressor.modifiers.transform.spinquant.mappings import SpinQuantMapping
    from transformers import AutoConfig

    from qep_modifier.workflow import InputError, check_recipe_fits, load_recipe

    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    packaged = load_recipe("w3a16_spinquant_qep").modifiers
    spinquant = next(modifier for modifier in packaged if isinstance(modifier, SpinQuantModifier))
    mappings = SpinQuantMapping(
        embedding="re:.*embed_tokens$", attn="re:.*self_attn$", attn_q="re:.*q_proj$", attn_k="re:.*k_proj$",
        attn_v="re:.*v_proj$", attn_o="re:.*o_proj$", mlp_in=["re:.*up_proj$", "re:.*gate_proj$"],
        mlp_out=["re:.*down_proj$"], lm_head="lm_head",
    )
    with_mappings = SpinQuantModifier(rotations=spinquant.rotations, transform_type=spinquant.transform_type, mappings=mappings)
    assert "mappings" in with_mappings.model_fields_set
    recipe = SimpleNamespace(modifiers=[with_mappings, *(m for m in packaged if m is not spinquant)])
    with pytest.raises(InputError, match=r"^SpinQuantModifier does not support model type gemma3_text: "):
        check_recipe_fits(config, recipe)


def test_full_range_observer_on_asymmetric_weights_is_refused_when_parsed():
    with pytest.raises(ValueError) as error:
        QEPModifier(targets="Linear", config_groups=group_scheme(3, 32, symmetric=False, observer="full_range_mse"))
    message = str(error.value)
    assert "config_groups.group_0: observer 'full_range_mse' is the full-range symmetric grid, but the weights are asymmetric" in message
    assert "use symmetric: true, or memoryless_mse" in message
    QEPModifier(targets="Linear", config_groups=group_scheme(3, 32, observer="full_range_mse"))  # symmetric: accepted


def test_the_shipped_symmetric_w2_recipe_runs_on_the_full_range_grid_down_to_0_4():
    # w2a16_spinquant_qep's 76.71 was measured with the full-range observer searching
    # shrinks down to 0.4x (benchmarks/methods.yaml full_range_wide): the recipe must say so
    from qep_modifier.workflow import PACKAGED_RECIPES, load_recipe

    recipe = load_recipe(PACKAGED_RECIPES / "w2a16_spinquant_qep.yaml")
    qep = next(modifier for modifier in recipe.modifiers if isinstance(modifier, QEPModifier))
    weights = qep.resolve_quantization_config().config_groups["group_0"].weights
    assert weights.observer == "full_range_mse" and weights.observer_kwargs == {"maxshrink": 0.6}
    assert weights.symmetric and weights.num_bits == 2
    assert (qep.refit_scales, qep.block_tuning_epochs, qep.block_tuning_learning_rate) == (2, 3, 0.01)
