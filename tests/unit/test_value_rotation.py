"""The exact per-head value rotation (qep_modifier/value_rotation.py): orthogonal
matrices, the layouts of every family's attention values, the rotation against a
float64 reference, and the model's function unchanged on every family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qep_modifier.value_rotation import (
    VALUE_ROTATION_MODEL_TYPES,
    head_rotation,
    rotate_values,
    value_layouts,
    value_rotation_misfit,
)
from tests.models import FAMILIES, tiny_family_model

#: every family of the matrix QEP runs on, and Falcon's two other attention layouts
CASES = [(family, {}) for family in FAMILIES if family != "gpt2"] + [
    ("falcon", {"multi_query": False}),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
]


@pytest.fixture(scope="module")
def held_out():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("size", [32, 36, 64, 96, 7])
@pytest.mark.parametrize("kind", ["random-hadamard", "hadamard", "random-orthogonal"])
def test_head_rotation_is_orthogonal_in_float64(size, kind):
    rotation = head_rotation(size, kind, seed=3)
    assert rotation.dtype == torch.float64 and rotation.shape == (size, size)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-13)
    if kind != "random-orthogonal" and size != 7:  # a Hadamard matrix: every entry +-1/sqrt(n)
        torch.testing.assert_close(rotation.abs(), torch.full((size, size), size ** -0.5, dtype=torch.float64))


def test_hadamard_is_sylvesters_matrix_whatever_the_seed():
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    sylvester = deterministic_hadamard_matrix(64, dtype=torch.float64) / 8
    assert torch.equal(head_rotation(64, "hadamard", seed=1), sylvester)
    assert torch.equal(head_rotation(36, "hadamard", seed=1), head_rotation(36, "hadamard", seed=2))


def test_random_signs_follow_the_seed():
    assert torch.equal(head_rotation(32, seed=1), head_rotation(32, seed=1))
    assert not torch.equal(head_rotation(32, seed=1), head_rotation(32, seed=2))


def test_rotate_values_matches_a_float64_reference():
    # GQA: 4 query heads on 2 value heads, biases on the values (Qwen2)
    model = tiny_family_model("qwen2").double()
    layout = value_layouts(model)[0]
    d = layout.head_dim
    value_weight, value_bias = layout.value.weight.clone(), layout.value.bias.clone()
    output_weight = layout.output.weight.clone()
    rotation = head_rotation(d, seed=5)
    rotate_values(layout, rotation)

    on_values = torch.block_diag(*[rotation.T] * (value_weight.shape[0] // d))
    on_outputs = torch.block_diag(*[rotation] * (output_weight.shape[1] // d))
    torch.testing.assert_close(layout.value.weight, on_values @ value_weight, rtol=0, atol=1e-14)
    torch.testing.assert_close(layout.value.bias, on_values @ value_bias, rtol=0, atol=1e-14)
    torch.testing.assert_close(layout.output.weight, output_weight @ on_outputs, rtol=0, atol=1e-14)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family, overrides", CASES)
def test_rotating_values_leaves_every_family_unchanged(family, overrides, held_out):
    model = tiny_family_model(family, **overrides)
    reference = _logits(model, held_out)
    layouts = value_layouts(model)
    assert len(layouts) == model.config.num_hidden_layers
    before = [layout.value.weight.clone() for layout in layouts]
    for index, layout in enumerate(layouts):
        rotate_values(layout, head_rotation(layout.head_dim, seed=index))
    for layout, weight in zip(layouts, before):  # the weights did move
        assert (layout.value.weight - weight).abs().max() > 1e-2
    rotated = _logits(model, held_out)
    assert (rotated - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "falcon"])
def test_rotating_the_wrong_rows_of_a_fused_projection_changes_the_model(family, held_out):
    # the control for the test above: the query rows instead of the value rows
    model = tiny_family_model(family)
    reference = _logits(model, held_out)
    for index, layout in enumerate(value_layouts(model)):
        # GPT-NeoX interleaves (query, key, value) per head; the others start with the queries
        queries = tuple(chunk - 2 for chunk in layout.value_chunks) if family == "gpt_neox" else tuple(
            range(len(layout.value_chunks))
        )
        assert set(queries).isdisjoint(layout.value_chunks)
        rotate_values(dataclasses.replace(layout, value_chunks=queries), head_rotation(layout.head_dim, seed=index))
    assert (_logits(model, held_out) - reference).abs().max() > 1e-3 * reference.abs().max()


def test_an_unknown_model_type_is_refused_in_one_line():
    model = tiny_family_model("gpt2")
    with pytest.raises(ValueError) as refused:
        value_layouts(model)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("ValueRotationModifier does not know where model type gpt2 keeps its attention values")
    assert message == value_rotation_misfit("gpt2")
    assert value_rotation_misfit("gemma3_text") is None
    assert {FAMILIES[family][0] for family, _ in CASES} == set(VALUE_ROTATION_MODEL_TYPES)
