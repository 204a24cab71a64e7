"""The calibration plan of a subgraph and of each decoder layer in it.

Pure functions over what the model showed: which sequential targets (decoder
layers) a subgraph runs, and a *trace* of one layer forward, the target Linears'
calls in order, each with a key that names its input tensor (equal keys: the very
same tensor, not written in place in between). Nothing here runs a model; the
tests build traces by hand.

Within-block order (``true_sequential``): a layer's Linears are quantized in
groups of modules that consume the same input, in execution order (for a Llama
block: q/k/v, o, gate/up, down). Experts of a mixture of experts run one after
another, so their Linears would form one group per expert and role; a group whose
roles all belong to one earlier group joins it (one group per expert *role*):
expert ``e``'s inputs depend only on its own earlier Linears and on what came
before the experts, all of which that earlier group follows.

A group's statistics come from a *replay*: the layer run again on the recorded
batch, with the earlier groups quantized, until the group's inputs are seen.
Members that share an input with an earlier member's call (k and v after q, up
after gate, every expert fed the same hidden state) need not be reached: the
replay stops at the pre-hook of the group's last *source* call, the last call
whose input no earlier member call of the group had, and the other calls take
their source's input (:attr:`Group.sources`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "CallRef",
    "Group",
    "LayerPlan",
    "SubgraphPlan",
    "TraceCall",
    "expert_role",
    "plan_layer",
    "plan_subgraph",
]

T = TypeVar("T")

#: One call of a module in a forward: ``(module, n)`` is its ``n``-th call (from 0).
CallRef = tuple[Hashable, int]


@dataclass(frozen=True)
class TraceCall:
    """A target Linear's call in a traced forward, and the key of its input."""

    module: Hashable
    input_key: Hashable


@dataclass(frozen=True)
class Group:
    """Linears quantized together, after the groups before them.

    :param modules: the members, in the order of their first calls
    :param sources: each traced member call -> the call whose input it takes (its
        own, or an earlier member call with the same input)
    :param stop: the call at whose pre-hook a replay has every input the group
        needs; ``None`` when a member was never traced (the replay runs to the
        end of the forward and every member call is seen)
    :param paired: whether the group needs the full-precision stream beside the
        quantized one (a member is corrected, or errors are reported)
    """

    modules: tuple[Hashable, ...]
    sources: dict[CallRef, CallRef]
    stop: CallRef | None
    paired: bool

    def inputs(self, captured: Mapping[Hashable, Sequence[T]]) -> dict[Hashable, list[T]]:
        """Each member's inputs, call by call, from what a pass captured (a
        module's inputs in call order): a traced call the pass did not reach
        takes its source's input."""
        result = {}
        for module in self.modules:
            own = list(captured.get(module, ()))
            number = len(own)
            while (module, number) in self.sources:
                source_module, source_number = self.sources[(module, number)]
                reached = captured.get(source_module, ())
                if source_number >= len(reached):
                    raise RuntimeError(
                        "QEP: a layer called its Linears differently from the batch "
                        "it was traced on; a replay cannot find their inputs"
                    )
                own.append(reached[source_number])
                number += 1
            result[module] = own
        return result


@dataclass(frozen=True)
class LayerPlan:
    """A decoder layer's groups, in the order they are quantized.

    :param groups: the groups
    :param call_order: every traced member call -> its position in the trace
    """

    groups: tuple[Group, ...]
    call_order: dict[CallRef, int]

    @property
    def paired_modules(self) -> tuple[Hashable, ...]:
        """Members of groups that need the full-precision stream."""
        return tuple(m for group in self.groups if group.paired for m in group.modules)

    @property
    def full_precision_stop(self) -> CallRef | None:
        """Where a full-precision pass may end when nobody reads its output: the
        last stop of the paired groups (``None``: run to the end)."""
        stops = [group.stop for group in self.groups if group.paired]
        if not stops or None in stops:
            return None
        return max(stops, key=self.call_order.__getitem__)


@dataclass(frozen=True)
class SubgraphPlan:
    """What one pipeline subgraph holds: its layers in execution order, then the
    quantized modules outside every layer (e.g. a quantized ``lm_head``), which
    are quantized last from the pipeline's own calibration pass."""

    layers: tuple[Hashable, ...]
    outside: tuple[Hashable, ...]


_EXPERT_INDEX = re.compile(r"(experts?)\.\d+\.")


def expert_role(name: str) -> str:
    """``...mlp.experts.7.down_proj`` -> ``...mlp.experts.*.down_proj``."""
    return _EXPERT_INDEX.sub(r"\1.*.", name)


def plan_subgraph(
    subgraph_modules: Iterable[Hashable],
    layers: Sequence[Hashable],
    targets: Iterable[Hashable],
    layer_of: Callable[[Hashable], Hashable | None],
) -> SubgraphPlan:
    """The layers a subgraph runs (in ``layers`` order) and its outside targets.

    :param subgraph_modules: every module the subgraph runs
    :param layers: all sequential targets, in execution order
    :param targets: the modules to quantize, in model order
    :param layer_of: a target's layer, ``None`` for one outside every layer
    """
    present = set(subgraph_modules)
    return SubgraphPlan(
        layers=tuple(layer for layer in layers if layer in present),
        outside=tuple(
            module for module in targets if module in present and layer_of(module) is None
        ),
    )


def plan_layer(
    trace: Sequence[TraceCall],
    modules: Sequence[Hashable],
    *,
    role: Callable[[Hashable], str],
    paired: Callable[[Hashable], bool],
    true_sequential: bool = True,
) -> LayerPlan:
    """Group a layer's ``modules`` (the Linears it quantizes) from its ``trace``.

    :param trace: the layer's target Linear calls in one forward, in order
    :param modules: the modules to plan, in model order; those the trace never
        reached join the group of their expert role, or a last group
    :param role: a module's expert role (:func:`expert_role` of its name)
    :param paired: whether a module needs the full-precision stream
    :param true_sequential: ``False`` puts every module in one group
    """
    wanted = set(modules)
    calls: list[tuple[CallRef, Hashable]] = []
    seen_calls: dict[Hashable, int] = {}
    for entry in trace:
        if entry.module not in wanted:
            continue
        number = seen_calls.get(entry.module, 0)
        seen_calls[entry.module] = number + 1
        calls.append(((entry.module, number), entry.input_key))
    position = {call: index for index, (call, _) in enumerate(calls)}

    member_lists = _execution_groups(calls) if true_sequential else [
        [call[0] for call, _ in calls if call[1] == 0]
    ]
    member_lists = _merge_expert_groups(member_lists, role) if true_sequential else member_lists
    untraced = [module for module in modules if module not in seen_calls]
    member_lists = _place_untraced(member_lists, untraced, role, true_sequential)

    groups = []
    for members in member_lists:
        member_set = set(members)
        sources: dict[CallRef, CallRef] = {}
        first_with_key: dict[Hashable, CallRef] = {}
        for call, key in calls:
            if call[0] in member_set:
                sources[call] = first_with_key.setdefault(key, call)
        complete = all(module in seen_calls for module in members)
        own = [call for call, source in sources.items() if call == source]
        stop = max(own, key=position.__getitem__) if complete and own else None
        groups.append(
            Group(
                modules=tuple(members),
                sources=sources,
                stop=stop,
                paired=any(paired(module) for module in members),
            )
        )
    return LayerPlan(groups=tuple(groups), call_order=position)


def _execution_groups(calls: list[tuple[CallRef, Hashable]]) -> list[list[Hashable]]:
    """Modules by first call, a new group wherever the input changes."""
    groups: list[list[Hashable]] = []
    last_key = object()
    for (module, number), key in calls:
        if number > 0:
            continue
        if groups and key == last_key:
            groups[-1].append(module)
        else:
            groups.append([module])
        last_key = key
    return groups


def _merge_expert_groups(
    groups: list[list[Hashable]], role: Callable[[Hashable], str]
) -> list[list[Hashable]]:
    merged: list[list[Hashable]] = []
    role_group: dict[str, int] = {}
    for group in groups:
        roles = {role(module) for module in group}
        targets = {role_group.get(name) for name in roles}
        if len(targets) == 1 and None not in targets:
            merged[targets.pop()].extend(group)
            continue
        for name in roles:
            role_group.setdefault(name, len(merged))
        merged.append(list(group))
    return merged


def _place_untraced(
    groups: list[list[Hashable]],
    untraced: list[Hashable],
    role: Callable[[Hashable], str],
    true_sequential: bool,
) -> list[list[Hashable]]:
    if not untraced:
        return groups
    if not true_sequential and groups:
        groups[0].extend(untraced)
        return groups
    role_group = {role(module): index for index, group in enumerate(groups) for module in group}
    rest = []
    for module in untraced:
        index = role_group.get(role(module))
        if index is None:
            rest.append(module)
        else:
            groups[index].append(module)
    return groups + ([rest] if rest else [])
