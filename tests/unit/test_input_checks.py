"""The pure checks behind the one-line input errors (issue 24, items 4 and 5)."""

from types import SimpleNamespace

import pytest
import torch

from qep_modifier.cli import check_lm_eval_paths
from qep_modifier.distributed import CollectiveError, gather, waiting_at
from qep_modifier.evaluation import (
    NonFiniteLogits,
    calibration_dataset,
    first_non_finite_logits,
    windows_nll,
)
from qep_modifier.workflow import InputError, check_calibration_size, check_seq_len, read_text_file


def test_first_non_finite_logits_is_the_first_window_then_position():
    logits = torch.zeros(3, 4, 5)
    assert first_non_finite_logits(logits) is None
    logits[2, 0, 0] = float("inf")
    logits[1, 2, 3] = float("nan")
    logits[1, 3, 0] = float("nan")
    assert first_non_finite_logits(logits) == (1, 2)


def test_windows_nll_names_the_window_across_batches():
    class Broken(torch.nn.Module):
        """Finite logits except for window 3 (of the text), position 1."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 5)
            logits[input_ids[:, 0] == 3, 1, 2] = float("-inf")
            return SimpleNamespace(logits=logits)

    windows = torch.tensor([[0, 1, 2], [1, 1, 1], [2, 2, 2], [3, 0, 0]])
    assert windows_nll(Broken(), windows[:3], batch_size=2, check_finite=True)[1] == 6
    with pytest.raises(NonFiniteLogits) as raised:
        windows_nll(Broken(), windows, batch_size=2, check_finite=True)
    assert (raised.value.window, raised.value.position) == (3, 1)
    assert str(raised.value) == "logits not finite (-inf) at window 3, position 1"
    windows_nll(Broken(), windows, batch_size=2)  # unchecked, as before: no error


def test_calibration_dataset_takes_at_most_one_window_per_start_position():
    ids = torch.arange(20)
    assert len(calibration_dataset(ids, num_samples=12, seq_len=8)) == 12  # starts 0..11
    with pytest.raises(ValueError, match=r"its 20 tokens give 12 distinct windows of seq_len=8 .*2 without overlap"):
        calibration_dataset(ids, num_samples=13, seq_len=8)


def test_seq_len_is_checked_against_the_familys_position_field():
    gpt2_style = SimpleNamespace(n_positions=1024)
    check_seq_len(gpt2_style, 1024, "gpt2")
    with pytest.raises(InputError, match="--seq-len 1025 is above model gpt2's n_positions 1024"):
        check_seq_len(gpt2_style, 1025, "gpt2")
    check_seq_len(SimpleNamespace(), 10**6, "unknown")  # no field: nothing to check


def test_calibration_size_against_available_memory():
    t5_style = SimpleNamespace(d_model=64)
    per_window = 16 * 64 * 4 * 3
    check_calibration_size(t5_style, 10, 16, available=10 * per_window)
    with pytest.raises(InputError, match=r"--num-samples 11 x --seq-len 16: .*d_model 64 .*at most about 10 windows"):
        check_calibration_size(t5_style, 11, 16, available=10 * per_window)


def test_read_text_file_refuses_what_is_not_utf8_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("caf\u00e9", encoding="utf-8")
    assert read_text_file(good) == "caf\u00e9"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for path, words in [
        (empty, "is empty"),
        (tmp_path / "missing.txt", "does not exist"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(InputError, match=words):
            read_text_file(path)


def test_lm_eval_paths_with_separators_are_refused(tmp_path):
    check_lm_eval_paths([None, tmp_path / "plain-model_1.5"])
    for name in ("a,b", "a=b"):
        with pytest.raises(InputError, match="contains ',' or '='"):
            check_lm_eval_paths([tmp_path / name])


def test_waiting_at_names_the_step_of_a_timed_out_collective():
    with pytest.raises(CollectiveError) as raised:
        with waiting_at("summing the statistics"):
            raise RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation")
    message = str(raised.value)
    assert message.startswith("this rank timed out waiting at summing the statistics: ")
    assert message.endswith("Timed out waiting 2000ms for recv operation")
    # other errors pass unchanged, and an inner step is kept
    for error in (ValueError("bad value"), RuntimeError("shape mismatch"), CollectiveError("inner step")):
        with pytest.raises(type(error)) as passed:
            with waiting_at("outer step"):
                raise error
        assert passed.value is error


def test_one_process_collectives_are_no_ops():
    assert gather(5) == [5]
