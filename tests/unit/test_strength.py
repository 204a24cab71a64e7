"""The propagation-strength policy: resolving the field, auto's split, choice,
fallback and summary; no model, no oneshot."""

import torch

from qep_modifier.statistics import LinearStatistics, accumulate_batch
from qep_modifier.strength import (
    AUTO,
    FALLBACK_STRENGTH,
    StrengthPolicy,
    choices_summary,
    held_out_split,
    merged_choices,
    resolve_propagation_strength,
    unmatched_patterns,
)


def test_resolve_propagation_strength_first_match_wins():
    mapping = {r"mlp\.down_proj$": 0.0, r"layers\.0\.": 0.9, r"proj": 0.3, "default": 0.5}
    assert resolve_propagation_strength("model.layers.0.mlp.down_proj", mapping) == 0.0
    assert resolve_propagation_strength("model.layers.0.self_attn.q_proj", mapping) == 0.9
    assert resolve_propagation_strength("model.layers.1.self_attn.q_proj", mapping) == 0.3
    assert resolve_propagation_strength("lm_head", mapping) == 0.5
    assert resolve_propagation_strength("lm_head", {r"proj": 0.3}) == 0.0
    assert resolve_propagation_strength("anything", 0.25) == 0.25


def test_resolve_accepts_auto_in_a_mapping():
    mapping = {r"down_proj$": 0.0, "default": "auto"}
    assert resolve_propagation_strength("model.layers.0.mlp.down_proj", mapping) == 0.0
    assert resolve_propagation_strength("model.layers.0.self_attn.q_proj", mapping) == AUTO
    assert resolve_propagation_strength("x", "auto") == AUTO


def test_policy_corrects_auto_and_positive_strengths_only():
    policy = StrengthPolicy.resolve(
        {r"down_proj$": 0.0, r"q_proj$": AUTO, "default": 0.5},
        ["l.0.q_proj", "l.0.k_proj", "l.0.down_proj"],
        correction_damping=0.01,
    )
    assert policy.corrects("l.0.q_proj") and policy.is_auto("l.0.q_proj")
    assert policy.corrects("l.0.k_proj") and not policy.is_auto("l.0.k_proj")
    assert not policy.corrects("l.0.down_proj")
    assert not policy.corrects("not.a.target")  # unknown names: strength 0
    assert policy.any_auto
    assert not StrengthPolicy.resolve(0.5, ["a"], 0.01).any_auto


def test_unmatched_patterns_leave_out_default_and_plain_numbers():
    mapping = {r"down_proj$": 0.0, r"nothing_here": 0.3, "default": 0.5}
    assert unmatched_patterns(mapping, ["l.0.mlp.down_proj"]) == ["nothing_here"]
    assert unmatched_patterns(0.5, ["anything"]) == []


def test_held_out_split_is_the_same_however_batches_are_spread():
    digests = ["d", "a", "c", "b", "e"]
    alone = held_out_split([digests], 0)
    # sorted a b c d e: every other one (b, d) held out
    assert [d for d, held in zip(digests, alone) if held] == ["d", "b"]
    spread = [digests[:2], digests[2:]]
    held = [d for r in range(2) for d, h in zip(spread[r], held_out_split(spread, r)) if h]
    assert sorted(held) == ["b", "d"]


def _statistics(batches, module, held_out=False):
    stats = LinearStatistics.empty(module, "cpu", cross_term=True, full_precision_gram=held_out)
    for full_precision, quantized in batches:
        accumulate_batch({module: stats}, {module: [quantized]}, {module: [full_precision]})
    return stats


def test_choose_falls_back_without_two_sides_and_records_every_choice():
    module = torch.nn.Linear(8, 4, bias=False)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(1, 16, 8, generator=generator)
        batches.append((x, x + 0.1 * torch.randn(x.shape, generator=generator)))
    policy = StrengthPolicy({"m": AUTO}, correction_damping=0.01)
    everything = _statistics(batches, module)
    assert policy.choose("m", module.weight, everything, None) == (FALLBACK_STRENGTH, True)
    held = _statistics(batches[1::2], module, held_out=True)
    strength, fell_back = policy.choose("m", module.weight, everything, held)
    assert not fell_back and strength in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert policy.chosen == {"m": strength}


def test_choices_merge_over_ranks_and_summarise_per_role():
    chosen = merged_choices([{"model.layers.0.mlp.gate_proj": 0.5}, {"model.layers.1.mlp.gate_proj": 1.0}])
    assert chosen == {"model.layers.0.mlp.gate_proj": 0.5, "model.layers.1.mlp.gate_proj": 1.0}
    assert "mlp.gate_proj: 0.75 (2)" in choices_summary(chosen)
    assert choices_summary({}) is None
