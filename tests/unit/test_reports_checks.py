"""The problem log and error report merged over ranks, and the model checks on
``(name, module)`` pairs; no oneshot."""

import types

import pytest
import torch

from qep_modifier.checks import (
    calibration_tokens,
    check_group_sizes,
    check_modules,
)
from qep_modifier.reports import ErrorReport, ProblemLog


def test_problem_log_notes_each_name_once_and_merges_in_rank_order():
    first, second = ProblemLog(), ProblemLog()
    first.note("unpaired", "a")
    first.note("unpaired", "a")
    second.note("uncalibrated", "c")
    second.note("unpaired", "b")
    second.note("unpaired", "a")
    merged = ProblemLog.merged([first, second])
    assert merged.as_dict() == {"unpaired": ["a", "b"], "uncalibrated": ["c"]}
    assert "2 module(s)" in merged.warning() and ProblemLog().warning() is None


def test_error_report_merges_rows_of_every_rank_in_quantization_order():
    report = ErrorReport(order=["q", "k", "lm_head"], rows={"k": {"name": "k"}})
    rows_by_rank = [report.rows, {"q": {"name": "q"}}]
    assert [row["name"] for row in report.merged(rows_by_rank)] == ["q", "k"]


def _linear(in_features, strategy="group", group_size=32, type_="int", activations=None, num_bits=3):
    module = torch.nn.Linear(in_features, 4, bias=False, device="meta")
    weights = types.SimpleNamespace(
        strategy=strategy, group_size=group_size, type=type_, num_bits=num_bits
    )
    module.quantization_scheme = types.SimpleNamespace(
        weights=weights, input_activations=activations, output_activations=None
    )
    return module


def test_group_sizes_name_the_misfit_and_what_fits():
    named = [("a", _linear(64)), ("b", _linear(96)), ("c", _linear(48, group_size=None, strategy="channel"))]
    check_group_sizes(named[:1])
    with pytest.raises(ValueError, match=r"FOEMModifier: group_size 64 does not divide the input width 96") as error:
        check_group_sizes([("a", _linear(64)), ("b", _linear(96, group_size=64))], owner="FOEMModifier")
    assert "fit every targeted module: 32" in str(error.value)


def test_weight_only_int_bits_and_strategy_fits():
    with pytest.raises(ValueError, match="weight-only: a quantizes activations"):
        check_modules([("a", _linear(64, activations=object()))])
    with pytest.raises(ValueError, match="integers only: a"):
        check_modules([("a", _linear(64, type_="float"))])
    with pytest.raises(ValueError, match="a: weights num_bits = 1 is outside 2-8"):
        check_modules([("a", _linear(64, num_bits=1))])
    tensor = [("t", _linear(64, strategy="tensor"))]
    check_modules(tensor)  # no refits, no tuning: nothing asked of the strategy
    with pytest.raises(ValueError, match="refit_scales needs the group or channel strategy: t"):
        check_modules(tensor, refit_scales=2)
    with pytest.raises(ValueError, match="block_tuning_epochs tunes group or channel scales: t"):
        check_modules(tensor, block_tuning_epochs=1)


def test_calibration_tokens_count_the_mask_else_the_ids():
    assert calibration_tokens([{"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 0]]}, {"input_ids": [[4, 5]]}]) == 4
