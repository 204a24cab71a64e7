"""The layer and subgraph plans on hand-built traces: no model, no oneshot."""

import pytest

from qep_modifier.plan import TraceCall, expert_role, plan_layer, plan_subgraph


def _trace(*calls):
    """``("q", "x")`` pairs -> trace; the second item names the input tensor."""
    return [TraceCall(module, key) for module, key in calls]


LLAMA = _trace(
    ("q", "norm1"), ("k", "norm1"), ("v", "norm1"), ("o", "attn"),
    ("gate", "norm2"), ("up", "norm2"), ("down", "act"),
)
LLAMA_MODULES = ["q", "k", "v", "o", "gate", "up", "down"]


def _plan(trace, modules, paired=lambda m: m != "down", **kwargs):
    return plan_layer(trace, modules, role=expert_role, paired=paired, **kwargs)


def test_llama_block_groups_stops_and_sources():
    plan = _plan(LLAMA, LLAMA_MODULES)
    assert [group.modules for group in plan.groups] == [
        ("q", "k", "v"), ("o",), ("gate", "up"), ("down",)
    ]
    # a replay stops as soon as the group's one input is seen
    assert [group.stop for group in plan.groups] == [("q", 0), ("o", 0), ("gate", 0), ("down", 0)]
    q_group, _, mlp_group, down_group = plan.groups
    assert q_group.sources == {("q", 0): ("q", 0), ("k", 0): ("q", 0), ("v", 0): ("q", 0)}
    assert mlp_group.sources == {("gate", 0): ("gate", 0), ("up", 0): ("gate", 0)}
    assert [group.paired for group in plan.groups] == [True, True, True, False]
    assert plan.paired_modules == ("q", "k", "v", "o", "gate", "up")
    # a full-precision pass whose output nobody reads may stop before gate
    assert plan.full_precision_stop == ("gate", 0)
    assert plan.call_order[("down", 0)] == 6


def test_without_true_sequential_one_group_stops_at_the_last_new_input():
    (group,) = _plan(LLAMA, LLAMA_MODULES, true_sequential=False).groups
    assert group.modules == tuple(LLAMA_MODULES)
    assert group.stop == ("down", 0)
    assert group.paired


def test_group_inputs_fill_the_calls_a_replay_did_not_reach():
    q_group = _plan(LLAMA, LLAMA_MODULES).groups[0]
    # the replay stopped at q's pre-hook: k and v take q's input
    assert q_group.inputs({"q": ["x"]}) == {"q": ["x"], "k": ["x"], "v": ["x"]}
    with pytest.raises(RuntimeError, match="differently"):
        q_group.inputs({})


def _moe_trace(num_experts, shared_expert_input):
    calls = [("q", "n1"), ("k", "n1"), ("v", "n1"), ("o", "attn")]
    for expert in range(num_experts):
        key = "n2" if shared_expert_input else f"routed{expert}"
        calls += [
            (f"mlp.experts.{expert}.gate_proj", key),
            (f"mlp.experts.{expert}.up_proj", key),
            (f"mlp.experts.{expert}.down_proj", f"act{expert}"),
        ]
    return _trace(*calls)


def _experts(num_experts):
    return [
        f"mlp.experts.{expert}.{role}_proj"
        for expert in range(num_experts)
        for role in ("gate", "up", "down")
    ]


def test_experts_fed_one_hidden_state_form_one_group_per_role_and_stop_at_the_first():
    # moe_calibrate_all_experts: every expert runs on the very same tensor
    plan = _plan(_moe_trace(4, True), ["q", "k", "v", "o", *_experts(4)], paired=lambda m: True)
    gate_up, down = plan.groups[2], plan.groups[3]
    assert sorted(gate_up.modules) == sorted(m for m in _experts(4) if "down" not in m)
    assert sorted(down.modules) == sorted(m for m in _experts(4) if "down" in m)
    assert gate_up.stop == ("mlp.experts.0.gate_proj", 0)  # one input for all eight
    assert down.stop == ("mlp.experts.3.down_proj", 0)  # four inputs: the last one
    filled = gate_up.inputs({"mlp.experts.0.gate_proj": ["h"]})
    assert all(inputs == ["h"] for inputs in filled.values())


def test_routed_experts_stop_after_the_last_experts_own_input():
    plan = _plan(_moe_trace(3, False), ["q", "k", "v", "o", *_experts(3)])
    gate_up = plan.groups[2]
    assert gate_up.stop == ("mlp.experts.2.gate_proj", 0)
    assert gate_up.sources[("mlp.experts.1.up_proj", 0)] == ("mlp.experts.1.gate_proj", 0)


def test_an_expert_missing_from_the_trace_joins_its_role_and_ends_early_stops():
    trace = [call for call in _moe_trace(3, False) if "experts.2." not in call.module]
    plan = _plan(trace, ["q", "k", "v", "o", *_experts(3)])
    gate_up, down = plan.groups[2], plan.groups[3]
    assert "mlp.experts.2.gate_proj" in gate_up.modules and "mlp.experts.2.down_proj" in down.modules
    # no trace says where its calls come, so its groups' replays run to the end
    assert gate_up.stop is None and down.stop is None
    assert plan.full_precision_stop is None
    assert plan.groups[0].stop == ("q", 0)


def test_a_module_called_twice_stops_after_its_second_input():
    trace = _trace(("proj", "x"), ("other", "y"), ("proj", "z"))
    plan = _plan(trace, ["proj", "other"], paired=lambda m: True)
    assert [group.modules for group in plan.groups] == [("proj",), ("other",)]
    assert plan.groups[0].stop == ("proj", 1)
    assert plan.groups[0].inputs({"proj": ["x", "z"]}) == {"proj": ["x", "z"]}


def test_a_tensor_written_in_place_is_a_new_input():
    # capture keys inputs by (id, version): a write between two calls splits them
    trace = _trace(("q", (1, 0)), ("k", (1, 1)))
    plan = _plan(trace, ["q", "k"])
    assert [group.modules for group in plan.groups] == [("q",), ("k",)]


def test_modules_already_quantized_are_left_out():
    plan = _plan(LLAMA, ["o", "gate", "up", "down"])
    assert [group.modules for group in plan.groups] == [("o",), ("gate", "up"), ("down",)]


def test_full_precision_stop_is_none_when_no_group_is_paired():
    plan = _plan(LLAMA, LLAMA_MODULES, paired=lambda m: False)
    assert plan.paired_modules == () and plan.full_precision_stop is None


def test_subgraph_plan_orders_layers_and_puts_outside_modules_last():
    layers = ["layer0", "layer1", "layer2"]
    layer_of = {"q0": "layer0", "q1": "layer1", "q2": "layer2", "lm_head": None}
    # two layers per subgraph, the last with the quantized lm_head
    plan = plan_subgraph(
        ["norm", "layer2", "lm_head", "layer1", "q1", "q2"],
        layers,
        ["q0", "q1", "q2", "lm_head"],
        layer_of.get,
    )
    assert plan.layers == ("layer1", "layer2")
    assert plan.outside == ("lm_head",)
    head = plan_subgraph(["embed"], layers, ["q0"], layer_of.get)
    assert head.layers == () and head.outside == ()


def test_expert_role():
    assert expert_role("model.layers.3.mlp.experts.17.down_proj") == "model.layers.3.mlp.experts.*.down_proj"
    assert expert_role("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
