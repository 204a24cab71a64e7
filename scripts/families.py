"""The recipe x family matrix of docs/families.md: every shipped recipe on every tiny random
family of ``tests.models.FAMILIES``, the relative logit error on held-out tokens over
round-to-nearest's on the same grid, or ``refused`` / ``Conv1D`` (the one-line refusals).

    python scripts/families.py [--families llama,opt] [--recipes w3a16_qep_gptq] [--samples 16] [--seq-len 64]

Prints one Markdown table (families as rows). Minutes on 2 CPU cores for the whole matrix.
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: a second thread only spins
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


if __name__ == "__main__":
    main()
