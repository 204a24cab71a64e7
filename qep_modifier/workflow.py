"""What the applications share: recipe in, calibration windows, ``oneshot``,
perplexity, the gap-recovered figure and the bar chart.

``qep-demo``, ``qep-oneshot``, ``qep-eval`` and ``benchmarks/run.py`` all run
text -> tokens -> windows -> ``oneshot`` -> perplexity; they do it through the
functions here, so every one of them samples, quantizes and scores the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from qep_modifier.evaluation import (
    calibration_dataset,
    evaluation_windows,
    perplexity,
    tokenize_text,
)

__all__ = [
    "bar_chart",
    "calibration_windows",
    "gap_recovered",
    "load_causal_lm",
    "load_recipe",
    "quantize",
    "score",
    "scoring_windows",
    "GAP_RECOVERED",
]

#: How the tables explain their gap-recovered column.
GAP_RECOVERED = "gap recovered = (ppl_gptq - ppl) / (ppl_gptq - ppl_fp), GPTQ = stock GPTQModifier"


def load_recipe(path: Path, report: bool = False):
    """The recipe's modifiers, built here (not by ``oneshot``) so the caller holds
    them. With ``report``, a modifier with a ``report_errors`` field
    (``QEPModifier``, ``FOEMModifier``) gets ``report_errors: true`` unless the
    YAML sets the field itself; its ``error_report`` fills during calibration."""
    from llmcompressor.recipe import Recipe

    import qep_modifier  # noqa: F401  (registers QEPModifier and FOEMModifier)

    recipe = Recipe.create_instance(str(path))
    if report:
        for modifier in recipe.modifiers:
            fields = getattr(type(modifier), "model_fields", {})
            if "report_errors" in fields and "report_errors" not in modifier.model_fields_set:
                modifier.report_errors = True
    return recipe


def calibration_windows(tokenizer, text: str | Path | torch.Tensor, num_samples: int, seq_len: int, seed: int = 0):
    """``num_samples`` windows of ``seq_len`` tokens drawn (``seed``) from ``text``
    (a file, a string, or token ids), as a ``datasets.Dataset``."""
    ids = text if isinstance(text, torch.Tensor) else tokenize_text(tokenizer, text)
    return calibration_dataset(ids, num_samples, seq_len, seed)


def scoring_windows(tokenizer, text: str | Path | torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``text`` for perplexity (the WikiText-2 protocol)."""
    ids = text if isinstance(text, torch.Tensor) else tokenize_text(tokenizer, text)
    return evaluation_windows(ids, seq_len, max_windows)


def quantize(model: str | Path, recipe, dataset, output_dir: Path | None = None, **oneshot_kwargs):
    """``oneshot`` on every sample of ``dataset``, in order; the quantized model.

    ``recipe``: a path, a ``Recipe`` or modifiers. ``output_dir``: also save the
    compressed checkpoint (and tokenizer) there."""
    from llmcompressor import oneshot

    import qep_modifier  # noqa: F401

    settings = dict(
        num_calibration_samples=len(dataset),
        max_seq_length=len(dataset[0]["input_ids"]),
        shuffle_calibration_samples=False,
    )
    settings.update(oneshot_kwargs)
    if output_dir is not None:
        settings["output_dir"] = str(output_dir)
    if isinstance(recipe, Path):
        recipe = str(recipe)
    return oneshot(model=str(model), dataset=dataset, recipe=recipe, **settings)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A model folder (compressed checkpoints too) for evaluation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def score(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of ``model`` on ``windows`` (see :mod:`qep_modifier.evaluation`)."""
    return perplexity(model.eval(), windows, batch_size=batch_size, progress=True)


def gap_recovered(ppl: float, gptq_ppl: float | None, fp_ppl: float | None) -> float | None:
    """The share of GPTQ's perplexity gap to full precision a method closes,
    ``(ppl_gptq - ppl) / (ppl_gptq - ppl_fp)``; ``None`` where undefined."""
    if gptq_ppl is None or fp_ppl is None or not gptq_ppl - fp_ppl > 0:
        return None
    if not all(math.isfinite(value) for value in (ppl, gptq_ppl, fp_ppl)):
        return None
    return (gptq_ppl - ppl) / (gptq_ppl - fp_ppl)


def bar_chart(
    path: Path,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str | None = None,
    log: bool = False,
    reference: tuple[str, float] | None = None,
) -> bool:
    """Grouped bars (one group per category, one bar per series) to ``path``;
    ``False`` when matplotlib is not installed (``pip install -e ".[plot]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    count = max(1, len(series))
    width = 0.8 / count
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(categories) * count / 2 + 2), 3.8))
    for index, (label, values) in enumerate(series.items()):
        positions = [x + index * width for x in range(len(categories))]
        bars = axis.bar(positions, values, width, label=label)
        if count == 1:
            for bar, value in zip(bars, values):
                axis.annotate(
                    f"{value:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    if reference is not None:
        axis.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    axis.set_xticks(
        [x + (count - 1) * width / 2 for x in range(len(categories))],
        categories,
        rotation=20 if count == 1 else 0,
        ha="right" if count == 1 else "center",
        fontsize=8,
    )
    axis.set_ylabel("perplexity (lower is better)")
    if log:
        axis.set_yscale("log")
    if title:
        axis.set_title(title)
    if count > 1 or reference is not None:
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
