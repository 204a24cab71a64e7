"""Snapshot what QEP writes on the tests' tiny models, to compare two checkouts bit for bit.

Run from a checkout's root (its ``qep_modifier`` and ``tests`` are imported)::

    python scripts/snapshot.py OUT_DIR            # one .pt per case under OUT_DIR
    python scripts/snapshot.py OUT_DIR --only llama_w3g32a_refit
    python scripts/snapshot.py --compare A B      # tensors that differ, per case

Each case builds its tiny model with a fixed seed (``tests/models.py``), runs
``oneshot`` with one QEP recipe on fixed calibration tokens, and saves every
quantized Linear's ``weight``, ``weight_scale`` and ``weight_zero_point``, every
RMSNorm weight (block tuning changes them), and the modifier's error report,
problems and chosen strengths.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout we stand in, not an installed copy

import torch  # noqa: E402

W3G32_ASYM_STATIC = dict(num_bits=3, group_size=32, symmetric=False, actorder="static")


def _llama_w3(**fields):
    from tests.models import group_scheme

    weights = dict(W3G32_ASYM_STATIC)
    return dict(config_groups=group_scheme(weights.pop("num_bits"), weights.pop("group_size"), **weights), **fields)


def _llama_w4a16(**fields):
    return dict(scheme="W4A16", **fields)  # group 128: divides the widths 128 and 256


def _moe_w3(**fields):
    from tests.models import group_scheme

    return dict(config_groups=group_scheme(3, 32), **fields)


REFIT = dict(refit_scales=2)
TUNING = dict(block_tuning_epochs=2)

#: name -> (model, recipe fields)
CASES = {
    "llama_w3g32a": ("llama", _llama_w3(report_errors=True)),
    "llama_w3g32a_refit": ("llama", _llama_w3(**REFIT)),
    "llama_w3g32a_tuning": ("llama", _llama_w3(**TUNING)),
    "llama_w3g32a_tuning_codes": ("llama", _llama_w3(**TUNING, block_tuning_code_learning_rate=0.002)),
    "llama_w3g32a_end_to_end": (
        "llama", _llama_w3(block_tuning_epochs=1, end_to_end_epochs=2, end_to_end_learning_rate=0.002)
    ),
    "llama_w3g32a_auto": ("llama", _llama_w3(propagation_strength="auto", report_errors=True)),
    "llama_w3g32a_foem": ("llama", _llama_w3(first_order_strength=0.1)),
    "llama_w3g32a_sweep_scales": ("llama", _llama_w3(group_scales="sweep")),
    "llama_w4a16": ("llama", _llama_w4a16()),
    "llama_w4a16_refit": ("llama", _llama_w4a16(**REFIT)),
    "llama_w4a16_tuning": ("llama", _llama_w4a16(**TUNING)),
    "moe_w3g32": ("moe", _moe_w3(report_errors=True)),
    "moe_w3g32_refit": ("moe", _moe_w3(**REFIT)),
    "moe_w3g32_tuning": ("moe", _moe_w3(**TUNING)),
}


def snapshot(case: str, folder: Path, models: Path) -> Path:
    from qep_modifier import QEPModifier
    from tests.models import save_tiny_llama, save_tiny_qwen3_moe, token_dataset, quantize

    model_name, fields = CASES[case]
    model_dir = models / model_name
    if not model_dir.exists():
        (save_tiny_llama if model_name == "llama" else save_tiny_qwen3_moe)(model_dir, seed=0)
    torch.manual_seed(0)
    modifier = QEPModifier(targets="Linear", ignore=["lm_head"], **fields)
    model = quantize(model_dir, modifier, token_dataset(8, 32, seed=1))
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            for key in ("weight", "weight_scale", "weight_zero_point", "weight_g_idx"):
                value = getattr(module, key, None)
                if value is not None:
                    tensors[f"{name}.{key}"] = value.detach().cpu().clone()
        elif type(module).__name__.endswith("RMSNorm"):
            tensors[f"{name}.weight"] = module.weight.detach().cpu().clone()
    saved = {
        "tensors": tensors,
        "error_report": modifier.error_report,
        "problems": modifier.problems,
        "chosen_strengths": modifier.chosen_strengths,
    }
    path = folder / f"{case}.pt"
    torch.save(saved, path)
    return path


def compare(first: Path, second: Path) -> int:
    """Print, per case, how many tensors (and other records) differ; 0 when all match."""
    total = 0
    names = sorted({p.name for p in first.glob("*.pt")} | {p.name for p in second.glob("*.pt")})
    for name in names:
        if not (first / name).exists() or not (second / name).exists():
            print(f"{name}: missing on one side")
            total += 1
            continue
        a, b = torch.load(first / name), torch.load(second / name)
        keys = set(a["tensors"]) | set(b["tensors"])
        differ = [
            key for key in sorted(keys)
            if key not in a["tensors"] or key not in b["tensors"]
            or a["tensors"][key].dtype != b["tensors"][key].dtype
            or not torch.equal(a["tensors"][key], b["tensors"][key])
        ]
        others = [key for key in ("error_report", "problems", "chosen_strengths") if a[key] != b[key]]
        total += len(differ) + len(others)
        shown = f" e.g. {differ[:3]}" if differ else ""
        print(f"{name}: {len(differ)} of {len(keys)} tensors differ{shown}; records differ: {others or 'none'}")
    print(f"TOTAL differing: {total}")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the .pt files")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="these cases alone")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        return 1 if compare(*args.compare) else 0
    if args.out is None:
        parser.error("give OUT_DIR or --compare A B")
    args.out.mkdir(parents=True, exist_ok=True)
    import qep_modifier

    print(f"qep_modifier from {qep_modifier.__file__}", flush=True)
    with tempfile.TemporaryDirectory() as models:
        for case in args.only or CASES:
            print(f"{case} -> {snapshot(case, args.out, Path(models))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
