"""Perplexity (WikiText-2 protocol) against a hand computation on a toy model."""

import math
from types import SimpleNamespace

import pytest
import torch

from qep_modifier.evaluation import (
    calibration_dataset,
    evaluation_windows,
    perplexity,
    tokenize_text,
    windows_nll,
)

VOCAB = 5
# next-token logits depend only on the current token: row t of this table
TABLE = [
    [2.0, 0.0, -1.0, 0.5, 0.0],
    [0.0, 1.0, 0.0, -2.0, 3.0],
    [1.5, 1.5, 0.0, 0.0, -1.0],
    [-1.0, 0.0, 2.5, 0.0, 1.0],
    [0.0, 0.0, 0.0, 0.0, 0.0],
]


class TableModel(torch.nn.Module):
    """``logits[b, t] = TABLE[input_ids[b, t]]``, returned as an object with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(TABLE))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def hand_nll(sequence: list[int]) -> float:
    """-sum log p(x[t+1] | x[t]) with log-softmax written out."""
    total = 0.0
    for current, following in zip(sequence[:-1], sequence[1:]):
        row = TABLE[current]
        log_norm = math.log(sum(math.exp(value) for value in row))
        total -= row[following] - log_norm
    return total


# 23 tokens: with seq_len 5 there are 4 full windows and 3 tokens left over
TOKENS = [(3 * index + 1) % VOCAB for index in range(23)]
SEQ_LEN = 5


def test_windows_are_cut_without_overlap_and_drop_the_tail():
    ids = torch.tensor(TOKENS)
    windows = evaluation_windows(ids, SEQ_LEN)
    assert windows.tolist() == [TOKENS[i : i + SEQ_LEN] for i in range(0, 20, SEQ_LEN)]
    assert evaluation_windows(ids, SEQ_LEN, max_windows=2).tolist() == [TOKENS[0:5], TOKENS[5:10]]
    assert evaluation_windows(ids, SEQ_LEN, max_windows=99).shape == (4, SEQ_LEN)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(ids[:4], SEQ_LEN)


@pytest.mark.parametrize("max_windows", [None, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_hand_computation(max_windows, batch_size):
    windows = evaluation_windows(torch.tensor(TOKENS), SEQ_LEN, max_windows)
    count = 4 if max_windows is None else max_windows
    # every window predicts its own tokens 1..4 from 0..3; nothing crosses a window border
    expected_total = sum(hand_nll(TOKENS[i : i + SEQ_LEN]) for i in range(0, count * SEQ_LEN, SEQ_LEN))
    expected_count = count * (SEQ_LEN - 1)

    model = TableModel()
    total, predicted = windows_nll(model, windows, batch_size=batch_size)
    assert predicted == expected_count
    assert total == pytest.approx(expected_total, rel=1e-6)
    assert perplexity(model, windows, batch_size=batch_size) == pytest.approx(
        math.exp(expected_total / expected_count), rel=1e-6
    )


def test_uniform_model_has_perplexity_vocab_size():
    class Uniform(TableModel):
        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    windows = evaluation_windows(torch.tensor(TOKENS), SEQ_LEN)
    assert perplexity(Uniform(), windows) == pytest.approx(VOCAB)


class SplitTokenizer:
    """A tokenizer stand-in: whitespace words -> their integer values."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [int(word) for word in text.split()]}


def test_tokenize_text_string_and_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("3 1 4\n1 5\n")
    assert tokenize_text(SplitTokenizer(), path).tolist() == [3, 1, 4, 1, 5]
    assert tokenize_text(SplitTokenizer(), "9 2").tolist() == [9, 2]


def test_calibration_samples_depend_only_on_the_seed():
    ids = torch.arange(1000)
    first = calibration_dataset(ids, num_samples=6, seq_len=16, seed=3)
    again = calibration_dataset(ids, num_samples=6, seq_len=16, seed=3)
    other = calibration_dataset(ids, num_samples=6, seq_len=16, seed=4)
    assert first["input_ids"] == again["input_ids"]
    assert first["input_ids"] != other["input_ids"]
    for row, mask in zip(first["input_ids"], first["attention_mask"]):
        assert row == list(range(row[0], row[0] + 16))  # a contiguous slice of the text
        assert mask == [1] * 16
    with pytest.raises(ValueError, match="fewer than one"):
        calibration_dataset(ids[:16], num_samples=1, seq_len=16)
