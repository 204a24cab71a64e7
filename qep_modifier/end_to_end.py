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

from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = [
    "DEFAULT_END_TO_END_LEARNING_RATE", "HeadInputs", "batch_on", "head_inputs", "logit_loss", "token_kl_divergence",
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


def logit_loss(
    block,
    head_logits: Callable[[torch.Tensor], torch.Tensor],
    student_inputs: Callable[[int], torch.Tensor],
    targets: list[torch.Tensor],
) -> Callable[[int], torch.Tensor]:
    """The loss end-to-end tuning steps on, for this rank's batch ``index``:
    :func:`token_kl_divergence` of the output embedding's logits
    (``head_logits``) on ``student_inputs(index)`` (its input under
    ``block.tuned_forward()``, calibrate's tuned parameters of a set of Linears
    and norms) from those on ``targets[index]`` (the full-precision input)."""

    def loss(index: int) -> torch.Tensor:
        with block.tuned_forward():
            hidden = student_inputs(index)
        target = targets[index].to(hidden.device)
        with torch.no_grad():
            target_logits = head_logits(target)
        return token_kl_divergence(head_logits(hidden), target_logits)

    return loss
