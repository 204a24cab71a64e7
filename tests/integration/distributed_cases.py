"""The cases the distributed tests run on two ranks and in one process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import Dataset

from qep_modifier import FOEMModifier, QEPModifier
from tests.models import group_scheme, token_dataset

W3 = dict(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32))


@dataclass(frozen=True)
class Case:
    model: str  # folder under the models directory: llama, moe or tied
    recipe: Callable[[], QEPModifier]
    oneshot: dict = field(default_factory=dict)
    identical: bool = False  # every rank passes the same two samples


CASES = {
    "qep": Case("llama", lambda: QEPModifier(**W3)),
    "cache_off": Case("llama", lambda: QEPModifier(cache_full_precision_inputs=False, **W3)),
    "resume_off": Case("llama", lambda: QEPModifier(resume_replays=False, **W3)),
    "no_true_sequential": Case("llama", lambda: QEPModifier(true_sequential=False, **W3)),
    "rtn": Case("llama", lambda: QEPModifier(base="rtn", **W3)),
    "foem": Case("llama", lambda: FOEMModifier(**W3)),
    "qep_foem": Case("llama", lambda: QEPModifier(first_order_strength=0.1, **W3)),
    "report": Case("llama", lambda: QEPModifier(report_errors=True, propagation_strength=0.5, **W3)),
    "block_tuning": Case("llama", lambda: QEPModifier(block_tuning_epochs=2, refit_scales=1, **W3)),
    # every layer falls back (its loss diverges): the same decision on both ranks
    "block_tuning_fallback": Case(
        "llama", lambda: QEPModifier(block_tuning_epochs=1, block_tuning_learning_rate=1000.0, **W3)
    ),
    # the codes move too: their unrounded start published from each batch's owner
    "block_tuning_codes": Case(
        "llama", lambda: QEPModifier(block_tuning_epochs=4, block_tuning_code_learning_rate=0.0005, **W3)
    ),
    # end-to-end tuning: each step's gradients from the rank that holds its batch
    "end_to_end": Case(
        "llama", lambda: QEPModifier(block_tuning_epochs=1, end_to_end_epochs=2, end_to_end_learning_rate=0.0005, **W3)
    ),
    "moe": Case("moe", lambda: QEPModifier(**W3)),
    "lm_head": Case("tied", lambda: QEPModifier(targets="Linear", config_groups=group_scheme(3, 32))),
    "identical_data": Case("llama", lambda: QEPModifier(**W3), identical=True),
}


def _samples(case: Case) -> Dataset:
    return token_dataset(2, 16 if case.model == "moe" else 32, seed=1)


def samples_of(case: Case, rank: int) -> Dataset:
    """Rank ``rank``'s one sample; with ``identical``, the whole set on every rank
    (llm-compressor 0.14 then gives every rank the first sample)."""
    return _samples(case) if case.identical else _samples(case).select([rank])


def both_samples(case: Case) -> Dataset:
    """Both ranks' samples in rank order: the single-process reference."""
    return _samples(case)
