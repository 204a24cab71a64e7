"""Bad recipes fail early, with the field and the allowed values in the message."""

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
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], scheme=scheme)
    with pytest.raises(ValueError) as error:
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
    ],
    ids=["refit-rtn", "refit-sweep-scales", "refit-tensor", "tuning-tensor"],
)
def test_scale_fields_that_cannot_apply_fail_before_calibration(model_dir, fields, scheme, words):
    recipe = QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=scheme, **fields)
    with pytest.raises(ValueError) as error:
        quantize(model_dir, recipe, token_dataset(2, 16, seed=0))
    message = str(error.value)
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
