"""End-to-end tuning (``end_to_end_epochs``): after every layer is quantized,
Adam steps on all quantized Linears' group scales and all norms' weights at
once (codes and zero points held), so that the quantized model's next-token
distribution matches the full-precision model's on the calibration batches.

Block tuning matches each layer's output in turn, each against its own
full-precision output; what error is left adds up through the layers, and
nothing there weighs a layer's error by what it does to the model's output.
This pass does: its loss is the KL divergence from the full-precision model's
distribution to the quantized model's, per token
(:func:`token_kl_divergence`). Both distributions come from the same output
embedding (``lm_head``): the full-precision model's inputs to it are recorded
once, at calibration start (:class:`HeadInputs`, one hidden state per token,
far smaller than the logits), and each step runs the quantized model up to
the output embedding and both hidden states through it. The checkpoint format
does not change: scales and norm weights are written back as block tuning
writes them.

Costs: one full-precision forward per batch at calibration start, then per
step one forward and one backward of the whole model (its activations for one
batch held for the backward), two forwards per checked batch; under
torch.distributed the steps follow block tuning's order (rank 0's batches,
then rank 1's, ...), each step's gradients sent from the rank that holds the
batch, so the result is one process's on the ranks' shards in rank order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = [
    "DEFAULT_END_TO_END_LEARNING_RATE", "HeadInputs", "batch_on", "head_inputs", "token_kl_divergence", "tune_end_to_end",
]

#: ``end_to_end_learning_rate``'s default: Adam's first step on the log-scale
#: gains and the norms' output gains (falling linearly to 0 over the steps).
#: SmolLM2-135M W3 g64 after ``w3a16_spinquant_qep``'s earlier settings, 32
#: windows: 28.82 -> 27.83 on wiki_eval with one pass at 0.001, 27.30 with two
#: at 0.003 (docs/autoround.md)
DEFAULT_END_TO_END_LEARNING_RATE = 0.003

def token_kl_divergence(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(target_logits) || softmax(logits))``
    (last dimension: the vocabulary), in float32."""
    log_p = target_logits.to(torch.float32).log_softmax(-1)
    log_q = logits.to(torch.float32).log_softmax(-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_token.mean()


class _Stop(Exception):
    """Ends a forward at the output embedding (its input is what we need)."""


class HeadInputs:
    """The input of the output embedding (``head``) on each forward of
    ``model``, the forward stopped there (the logits are computed from it)."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        self.model, self.head = model, head
        self._value: torch.Tensor | None = None

    def _pre_hook(self, module, args):
        self._value = args[0]
        raise _Stop

    def __call__(self, batch: Mapping) -> torch.Tensor:
        """The head's input on ``batch`` (keyword inputs of the model)."""
        self._value = None
        handle = self.head.register_forward_pre_hook(self._pre_hook)
        try:
            self.model(**batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        if self._value is None:
            raise RuntimeError("end-to-end tuning: the model's forward never reached its output embedding")
        return self._value


def batch_on(batch: Mapping, device) -> dict:
    """A dataloader batch with its tensors on ``device``."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def head_inputs(
    model: torch.nn.Module, head: torch.nn.Module, batches: Iterable[Mapping], device, keep_on
) -> list[torch.Tensor]:
    """The full-precision targets: the head's input on each batch (run on
    ``device``), without gradients, kept on ``keep_on``."""
    recorder = HeadInputs(model, head)
    with torch.no_grad():
        return [recorder(batch_on(batch, device)).detach().to(keep_on) for batch in batches]


def tune_end_to_end(
    block,
    head_logits: Callable[[torch.Tensor], torch.Tensor],
    student_inputs: Callable[[int], torch.Tensor],
    targets: list[torch.Tensor],
    epochs: int,
    learning_rate: float,
    step_owners: list[int],
    my_rank: int,
    checked: list[int],
    share: Callable,
    gather_mean: Callable[[list[float]], float],
    progress=None,
) -> tuple[float, float, list[float]]:
    """Adam on ``block.parameters()`` (calibrate's tuned parameters of a set of
    Linears and norms; ``block.tuned_forward()`` computes with them) for ``epochs`` passes, one step per batch
    (``step_owners``: which rank holds each step's batch; this rank's batches
    in order, ``student_inputs(i)``: the output embedding's input on this
    rank's batch ``i`` under the tuned forward; ``targets[i]``: the
    full-precision one; ``head_logits``: the output embedding).
    Returns the mean loss over the ``checked`` batches (this rank's indices;
    ``gather_mean`` averages every rank's) before and after, and each epoch's
    mean loss during it."""
    from qep_modifier.block_tuning import tune

    def loss(index: int) -> torch.Tensor:
        with block.tuned_forward():
            hidden = student_inputs(index)
        target = targets[index].to(hidden.device)
        with torch.no_grad():
            target_logits = head_logits(target)
        return token_kl_divergence(head_logits(hidden), target_logits)

    def checked_loss() -> float:
        with torch.no_grad():
            mine = [loss(index).item() for index in checked]
        if progress is not None:
            progress.update(len(mine))
        return gather_mean(mine)

    def batch_losses():
        mine = itertools.count()
        for owner in step_owners:
            if progress is not None:
                progress.update(1)
            if owner != my_rank:
                yield None  # another rank's batch: its gradients come from share
                continue
            yield loss(next(mine))

    start = checked_loss()
    owners = itertools.cycle(step_owners)
    history = tune(
        block.parameters(),
        batch_losses,
        epochs,
        [learning_rate] * len(block.parameters()),
        share=lambda parameters, value: share(parameters, value, next(owners)),
        decaying=([True] * len(block.parameters()), len(step_owners)),
    )
    finite = all(bool(torch.isfinite(parameter).all()) for parameter in block.parameters())
    final = checked_loss() if finite else math.nan
    return start, final, history
