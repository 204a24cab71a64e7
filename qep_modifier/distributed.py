"""What QEP does across ranks under ``torch.distributed`` (no-ops in one process).

Each rank calibrates on its own shard of the calibration set: it records its
batches, runs its own full-precision pass and replays, and accumulates its own
statistics. Per within-block group, once every rank has its statistics:

1. :func:`reduce_statistics` sums ``H~``, ``C``, ``G``, the sample and token
   counts over the ranks (and a module is paired only if it is on every rank),
   so every decision taken on them is the same on every rank;
2. :func:`assign_owners` gives each module one rank that corrects, observes,
   sweeps and writes it;
3. :func:`publish` sends each module's weight and quantization parameters from
   its owner to every rank's device copy and waits at a barrier, because ranks
   share one CPU copy of the weights (llm-compressor's ``DistributedCPUCache``)
   and none may replay or propagate through a module before its owner wrote it.

With two ranks of one sample each, every sum is ``P0 + P1`` in both runs, and
the result is bit for bit the single-process result on the same two samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_distributed
from compressed_tensors.utils import get_execution_device

from qep_modifier.statistics import LinearStatistics

__all__ = [
    "assign_owners",
    "barrier",
    "check_distinct_shards",
    "gather",
    "is_distributed",
    "publish",
    "rank",
    "reduce_statistics",
    "share_step",
    "shared",
]

QUANTIZATION_PARAMETERS = ("weight", "weight_scale", "weight_zero_point")


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def reduce_statistics(
    statistics: dict[torch.nn.Module, LinearStatistics], order: Sequence[torch.nn.Module]
) -> None:
    """Sum each module's statistics over the ranks, in place, in ``order`` (the
    same on every rank). A module unpaired on any rank is unpaired on all."""
    if not is_distributed():
        return
    modules = [module for module in order if module in statistics]
    if not modules:
        return
    device = statistics[modules[0]].hessian.device  # NCCL reduces device tensors only
    paired = torch.tensor([int(statistics[m].paired) for m in modules], device=device)
    tokens = torch.tensor([statistics[m].tokens for m in modules], device=device)
    _all_reduce([paired], dist.ReduceOp.MIN)
    _all_reduce([tokens], dist.ReduceOp.SUM)
    tensors = []
    for module, is_paired, count in zip(modules, paired.tolist(), tokens.tolist()):
        stats = statistics[module]
        stats.tokens = count
        if not is_paired:
            stats.unpair()
        tensors += [stats.hessian, stats.num_samples]
        tensors += [t for t in (stats.cross_term, stats.full_precision_gram) if t is not None]
    _all_reduce(tensors, dist.ReduceOp.SUM)


def assign_owners(units: Sequence[Sequence[torch.nn.Module]]) -> list[int]:
    """Each unit's owner rank (a unit: modules quantized together), balanced by
    input width; the same on every rank for the same ``units``."""
    if not is_distributed():
        return [0] * len(units)
    indices = list(range(len(units)))
    _, _, owner = greedy_bin_packing(
        indices,
        world_size(),
        item_weight_fn=lambda index: sum(m.weight.shape[1] for m in units[index]),
    )
    return [owner[index] for index in range(len(units))]


def publish(modules: Iterable[torch.nn.Module], owners: dict[torch.nn.Module, int]) -> None:
    """Every rank sees what each module's owner wrote: device copies are
    broadcast from the owner, then all ranks wait (shared CPU weights)."""
    if not is_distributed():
        return
    pending = []
    for module in modules:
        if get_execution_device(module).type == "cpu":
            continue  # one copy shared by all ranks: the barrier below suffices
        for name in QUANTIZATION_PARAMETERS:
            parameter = getattr(module, name, None)
            if parameter is not None:
                pending.append(dist.broadcast(parameter.data, src=owners[module], async_op=True))
    for work in pending:
        work.wait()
    dist.barrier()


def share_step(parameters: Sequence[torch.Tensor], loss: torch.Tensor | None, owner: int) -> float:
    """One block-tuning step's gradients and loss, from the rank that computed
    them (``owner``, whose ``loss`` is not ``None``) on every rank, so every
    rank's optimizer takes the same step; ``loss.item()`` in one process. A
    parameter without a gradient on the owner has none on any rank (Adam then
    leaves it alone, as in one process)."""
    if not is_distributed():
        return loss.item()
    device = parameters[0].device
    mine = rank() == owner
    has_gradient = torch.tensor(
        [int(mine and p.grad is not None) for p in parameters], device=device
    )
    value = torch.tensor([loss.item() if mine else 0.0], dtype=torch.float64, device=device)
    _broadcast([has_gradient, value], owner)
    gradients = []
    for parameter, present in zip(parameters, has_gradient.tolist()):
        if not present:
            parameter.grad = None
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradients.append(parameter.grad)
    _broadcast(gradients, owner)
    return value.item()


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (pickled), in rank order; ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shared(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_distinct_shards(calibration) -> None:
    """Refuse ranks fed the same calibration batches.

    llm-compressor 0.14's own split gives every rank the first shard when every
    rank passes the same dataset; QEP would then count each sample once per
    rank. Compares a digest of each rank's first batch; raises on every rank
    alike (so none waits for the others)."""
    if not is_distributed() or calibration is None:
        return
    digest = None
    for batch in calibration:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is not None:
            digest = hashlib.sha256(torch.as_tensor(ids).numpy().tobytes()).hexdigest()
        break
    digests = gather(digest)
    same = [
        (first, second)
        for first in range(len(digests))
        for second in range(first + 1, len(digests))
        if digests[first] is not None and digests[first] == digests[second]
    ]
    if same:
        first, second = same[0]
        raise ValueError(
            f"QEPModifier: ranks {first} and {second} got the same calibration batches; "
            "give each rank its own shard of the calibration set (e.g. "
            "dataset.shard(num_shards=world_size, index=rank)) before calling oneshot: "
            "llm-compressor 0.14 gives every rank the first shard when all pass the same "
            "dataset"
        )


def _broadcast(tensors: list[torch.Tensor], source: int) -> None:
    pending = [dist.broadcast(tensor, src=source, async_op=True) for tensor in tensors]
    for work in pending:
        work.wait()


def _all_reduce(tensors: list[torch.Tensor], op) -> None:
    pending = [dist.all_reduce(tensor, op=op, async_op=True) for tensor in tensors]
    for work in pending:
        work.wait()
