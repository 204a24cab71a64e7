"""The recipe x family matrix of docs/families.md: every shipped recipe on every tiny random
family of ``tests.models.FAMILIES``, the relative logit error on held-out tokens over
round-to-nearest's on the same grid, or ``refused`` / ``Conv1D`` (the one-line refusals).

    python scripts/families.py [--families llama,opt] [--recipes w3a16_qep_gptq] [--samples 16] [--seq-len 64]
    python scripts/families.py --tuning [--samples 64]

Prints one Markdown table (families as rows). Minutes on 2 CPU cores for the whole matrix.
``--tuning``: instead, the relative logit error (32 x 64 held-out tokens) of the asymmetric W3
and W2 recipes' QEPModifier without and with their scale refits and block tuning, without
rotation and, where the rotations fit, with them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from qep_modifier.workflow import PACKAGED_RECIPES
    from tests.models import (
        FAMILIES, load_model, logits, quantize, relative_error, round_to_nearest, save_tiny_family, token_dataset,
    )

    recipes = sorted(path.stem for path in PACKAGED_RECIPES.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--recipes", default=",".join(recipes))
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per calibration sequence")
    parser.add_argument("--tuning", action="store_true", help="refits + block tuning against none")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: a second thread only spins
    if args.tuning:
        return tuning_table(args)
    calibration = token_dataset(args.samples, args.seq_len, seed=1)
    held_out = torch.tensor(token_dataset(4, 48, seed=2)["input_ids"])
    chosen = args.recipes.split(",")
    print("| family | " + " | ".join(f"`{name}`" for name in chosen) + " |")
    print("|---" * (len(chosen) + 1) + "|")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families.split(","):
            folder = save_tiny_family(Path(work) / family, family)
            reference = logits(load_model(folder), held_out)
            cells = []
            for recipe in chosen:
                try:
                    model = quantize(folder, str(PACKAGED_RECIPES / f"{recipe}.yaml"), calibration)
                except ValueError as refused:
                    cells.append("Conv1D" if "Conv1D" in str(refused) else "refused")
                    continue
                names = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
                scheme = model.get_submodule(names[0]).quantization_scheme.weights
                rtn = logits(round_to_nearest(load_model(folder), names, scheme), held_out)
                error = relative_error(logits(model, held_out), reference)
                cells.append(f"{error / relative_error(rtn, reference):.2f}")
            print(f"| {family} | " + " | ".join(cells) + " |", flush=True)


def tuning_table(args) -> None:
    import torch

    from qep_modifier.rotations import SPINQUANT_MODEL_TYPES
    from qep_modifier.workflow import load_recipe
    from tests.models import FAMILIES, load_model, logits, quantize, relative_error, save_tiny_family, token_dataset

    calibration = token_dataset(args.samples, args.seq_len, seed=1)
    held_out = torch.tensor(token_dataset(32, 64, seed=2)["input_ids"])
    print("| family | W3, no rotation | W3, SpinQuant | W2, no rotation | W2, SpinQuant |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families.split(","):
            if family == "gpt2":
                continue
            folder = save_tiny_family(Path(work) / family, family)
            reference = logits(load_model(folder), held_out)
            cells = []
            for recipe in ("w3a16_asym_spinquant_qep", "w2a16_asym_spinquant_qep"):
                for rotate in (False, True):
                    if rotate and FAMILIES[family][0] not in SPINQUANT_MODEL_TYPES:
                        cells.append("")
                        continue
                    errors = []
                    for tuned in (False, True):
                        modifiers = [
                            modifier for modifier in load_recipe(recipe).modifiers
                            if rotate or type(modifier).__name__ != "SpinQuantModifier"
                        ]
                        if not tuned:
                            modifiers[-1].refit_scales, modifiers[-1].block_tuning_epochs = 0, 0
                        model = quantize(folder, modifiers, calibration)
                        errors.append(relative_error(logits(model, held_out), reference))
                    cells.append(f"{errors[0]:.4f} -> {errors[1]:.4f} ({100 * (errors[1] / errors[0] - 1):+.0f}%)")
            print(f"| {family} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
