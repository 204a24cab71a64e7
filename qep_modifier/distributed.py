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
   and none may replay or propagate through a module before its owner wrote it;
   :func:`publish_values` sends what else the owner's sweep left for a module
   (the unrounded codes block tuning starts from).

With two ranks of one sample each, every sum is ``P0 + P1`` in both runs, and
the result is bit for bit the single-process result on the same two samples.

A collective that fails or outlasts the process group's timeout (a rank hung,
stopped or dead; :func:`init_process_group` sets the timeout) raises
:class:`CollectiveError` naming the step that waited.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_distributed
from compressed_tensors.utils import get_execution_device

from qep_modifier.statistics import LinearStatistics

__all__ = [
    "CollectiveError",
    "assign_owners",
    "barrier",
    "check_distinct_shards",
    "gather",
    "init_process_group",
    "is_distributed",
    "publish",
    "publish_values",
    "rank",
    "reduce_statistics",
    "share_step",
    "shared",
    "waiting_at",
]

QUANTIZATION_PARAMETERS = ("weight", "weight_scale", "weight_zero_point")


class CollectiveError(RuntimeError):
    """A collective that failed or timed out, with the step that waited."""


def init_process_group(timeout_min: float = 30.0, **options) -> None:
    """Start torch.distributed for ranks started by torchrun: the accelerator's
    backend (NCCL on GPUs) with one accelerator per rank (``LOCAL_RANK``) where
    there is one, else gloo. A rank that waits at a collective longer than
    ``timeout_min`` minutes fails (:class:`CollectiveError` naming the step)
    instead of waiting silently. ``options`` go to ``dist.init_process_group``."""
    if not (math.isfinite(timeout_min) and timeout_min > 0):
        raise ValueError(f"timeout_min {timeout_min}: must be a positive number of minutes")
    if torch.accelerator.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(torch.accelerator.current_accelerator().type, local_rank)
        torch.accelerator.set_device_index(local_rank)
        options.setdefault("device_id", device)
        backend = dist.get_default_backend_for_device(device)
    else:
        backend = "gloo"
    with waiting_at("starting (every rank joins)"):
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **options)
    barrier(step="starting (every rank joins)")


#: words of the errors torch.distributed's backends raise when a peer does not answer
_PEER_LOST = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


@contextlib.contextmanager
def waiting_at(step: str):
    """Name ``step`` in the error of a collective that fails or times out inside
    (another rank hung, stopped or died); every other error passes unchanged."""
    try:
        yield
    except CollectiveError:
        raise  # an inner step already named itself
    except RuntimeError as error:
        text = str(error).strip()
        if not isinstance(error, dist.DistError) and not any(word in text.lower() for word in _PEER_LOST):
            raise
        what = "timed out" if any(word in text.lower() for word in _PEER_LOST[:2]) else "failed"
        first = text.splitlines()[0] if text else type(error).__name__
        where = f"rank {rank()} of {world_size()}" if dist.is_initialized() else "this rank"
        raise CollectiveError(
            f"{where} {what} waiting at {step}: another rank did not take part (hung, stopped "
            f"or dead?); the wait is bounded by the process group's timeout (--timeout-min): {first}"
        ) from error


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
    step = f"summing the calibration statistics of {len(modules)} modules over the ranks"
    _all_reduce([paired], dist.ReduceOp.MIN, step)
    _all_reduce([tokens], dist.ReduceOp.SUM, step)
    tensors = []
    for module, is_paired, count in zip(modules, paired.tolist(), tokens.tolist()):
        stats = statistics[module]
        stats.tokens = count
        if not is_paired:
            stats.unpair()
        tensors += [stats.hessian, stats.num_samples]
        tensors += [t for t in (stats.cross_term, stats.full_precision_gram) if t is not None]
    _all_reduce(tensors, dist.ReduceOp.SUM, step)


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
    modules = list(modules)
    with waiting_at(f"publishing the quantized weights of {len(modules)} modules from their owner ranks"):
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


def publish_values(
    values: dict[torch.nn.Module, torch.Tensor],
    modules: Iterable[torch.nn.Module],
    owners: dict[torch.nn.Module, int],
) -> dict[torch.nn.Module, torch.Tensor]:
    """Each module's float32 tensor of its weight's shape, computed by its owner
    (in ``values`` there), on every rank: broadcast from the owner, in the order
    of ``modules`` (the same on every rank). ``values`` in one process."""
    if not is_distributed():
        return values
    modules = list(modules)
    published = {}
    with waiting_at(f"publishing the sweep's values of {len(modules)} modules from their owner ranks"):
        pending = []
        for module in modules:
            device = get_execution_device(module)
            if rank() == owners[module]:
                tensor = values[module].to(device=device, dtype=torch.float32).contiguous()
            else:
                tensor = torch.empty(module.weight.shape, device=device, dtype=torch.float32)
            pending.append(dist.broadcast(tensor, src=owners[module], async_op=True))
            published[module] = tensor
        for work in pending:
            work.wait()
    return published


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
    step = f"a block-tuning step (gradients from rank {owner})"
    _broadcast([has_gradient, value], owner, step)
    gradients = []
    for parameter, present in zip(parameters, has_gradient.tolist()):
        if not present:
            parameter.grad = None
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradients.append(parameter.grad)
    _broadcast(gradients, owner, step)
    return value.item()


def barrier(step: str = "a barrier (every rank waits for the others)") -> None:
    """Wait for every rank (nothing in one process); ``step`` names it in errors."""
    if is_distributed():
        with waiting_at(step):
            dist.barrier()


def gather(value: Any, step: str = "gathering a value from every rank") -> list[Any]:
    """Every rank's ``value`` (pickled), in rank order; ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    with waiting_at(step):
        dist.all_gather_object(gathered, value)
    return gathered


def shared(value: Any, step: str = "sharing rank 0's value with every rank") -> Any:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value if rank() == 0 else None]
    with waiting_at(step):
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
    digests = gather(digest, step="comparing the ranks' first calibration batches")
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


def _broadcast(tensors: list[torch.Tensor], source: int, step: str) -> None:
    with waiting_at(step):
        pending = [dist.broadcast(tensor, src=source, async_op=True) for tensor in tensors]
        for work in pending:
            work.wait()


def _all_reduce(tensors: list[torch.Tensor], op, step: str) -> None:
    with waiting_at(step):
        pending = [dist.all_reduce(tensor, op=op, async_op=True) for tensor in tensors]
        for work in pending:
            work.wait()
