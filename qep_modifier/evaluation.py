"""Calibration samples and perplexity on plain text (the WikiText-2 protocol).

Perplexity: concatenate the text, tokenize it once, cut it into
non-overlapping windows of ``seq_len`` tokens, average the next-token negative
log-likelihood over every predicted token of every window, and exponentiate.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = [
    "tokenize_text",
    "calibration_dataset",
    "evaluation_windows",
    "first_non_finite_logits",
    "NonFiniteLogits",
    "perplexity",
    "windows_nll",
]


def tokenize_text(tokenizer, text: str | Path) -> torch.Tensor:
    """Token ids of a whole text (a string or a file path), as one 1-D tensor."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


def calibration_dataset(token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0):
    """``num_samples`` random windows of ``seq_len`` tokens, as a ``datasets.Dataset``.

    The same ids, ``num_samples``, ``seq_len`` and ``seed`` always give the same
    samples.
    """
    from datasets import Dataset

    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(
            f"num_samples and seq_len must be positive, got {num_samples}, {seq_len}"
        )
    if token_ids.numel() <= seq_len:
        raise ValueError(
            f"the calibration text has {token_ids.numel()} tokens, fewer than one "
            f"window of seq_len={seq_len}"
        )
    # windows start at random positions 0 .. n - seq_len - 1, drawn with replacement:
    # asking for more windows than there are positions repeats windows for certain
    tokens = token_ids.numel()
    distinct = tokens - seq_len
    if num_samples > distinct:
        raise ValueError(
            f"num_samples={num_samples} is more than the calibration text holds: its {tokens} "
            f"tokens give {distinct} distinct windows of seq_len={seq_len} (one per start "
            f"position; {tokens // seq_len} without overlap)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (num_samples,), generator=generator)
    rows = torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])
    return Dataset.from_dict(
        {"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()}
    )


def evaluation_windows(
    token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows ``[num_windows, seq_len]`` from the start of the text."""
    num_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(
            f"the evaluation text has {token_ids.numel()} tokens, fewer than one "
            f"window of seq_len={seq_len}"
        )
    return token_ids[: num_windows * seq_len].reshape(num_windows, seq_len)


class NonFiniteLogits(ValueError):
    """A model gave a NaN or infinite logit; ``window`` and ``position`` say the first."""

    def __init__(self, window: int, position: int, value: float):
        self.window, self.position, self.value = window, position, value
        super().__init__(f"logits not finite ({value}) at window {window}, position {position}")


def first_non_finite_logits(logits: torch.Tensor) -> tuple[int, int] | None:
    """``(window, position)`` of the first ``[window, position, vocab]`` row of
    ``logits`` holding a NaN or infinity (windows first, then positions), or ``None``."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    if not bad.any():
        return None
    window, position = divmod(int(bad.flatten().nonzero()[0]), bad.shape[1])
    return window, position


@torch.no_grad()
def windows_nll(
    model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, check_finite: bool = False
):
    """Total next-token negative log-likelihood and the number of predicted tokens.

    With ``check_finite``, :class:`NonFiniteLogits` names the first window and
    position whose logits are not finite (one pass over each batch's logits)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", leave=False)
    for start in batches:
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        if check_finite and (where := first_non_finite_logits(logits)) is not None:
            value = logits[where][~torch.isfinite(logits[where])][0].item()
            raise NonFiniteLogits(start + where[0], where[1], value)
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch[:, 1:]
        total -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return total, count


def perplexity(
    model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, check_finite: bool = False
) -> float:
    """exp(mean next-token NLL) over all windows (``check_finite``: see :func:`windows_nll`)."""
    total, count = windows_nll(model, windows, batch_size, progress, check_finite)
    return math.exp(total / count)
