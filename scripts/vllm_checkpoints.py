"""Write the tiny checkpoints that ``scripts/check_vllm.sh`` hands to vLLM's loader classes.

    python scripts/vllm_checkpoints.py OUT_DIR [--group 32] [--schemes w4-sym,...] [--recipes all|NAME,...]
        [--families none|all|llama,gemma3,...]

Run with this project's environment (it quantizes with ``QEPModifier``). Into ``OUT_DIR`` it
writes one compressed checkpoint of a tiny random Llama per scheme (``w{4,3,2}-g{group}-{sym,asym,full}``:
QEPModifier with that grid; ``full`` the full-range symmetric grid, signed scales) and one per shipped recipe (``recipe-<name>``: the YAML under
``qep_modifier/recipes/`` as a user runs it, rotations included), then prints each folder's
path on its own line after ``wrote``. ``--families``: one more per decoder family of
``tests/models.FAMILIES`` (``family-<name>``: its tiny random model, QEPModifier at W3 with the
group, symmetric; GPT-2, whose ``Conv1D`` nothing quantizes, is left out). The layout is what is checked, not the quality: four
calibration samples of 32 tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "qep_modifier" / "recipes"
#: sym / asym: the plain grids; full: the full-range symmetric grid (signed scales, the
#: full_range_mse observer): the same tensors, some scales negative
SCHEMES = [f"w{bits}-{kind}" for bits in (4, 3, 2) for kind in ("sym", "asym", "full")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group", type=int, default=32, help="group size of the scheme checkpoints")
    parser.add_argument(
        "--schemes", default=",".join(SCHEMES), help=f"comma list of {SCHEMES}, or none"
    )
    parser.add_argument(
        "--recipes", default="all", help="comma list of recipe file names (or stems), all, or none"
    )
    parser.add_argument(
        "--families", default="none", help="comma list of tests/models.FAMILIES names, all, or none"
    )
    args = parser.parse_args(argv)
    args.schemes = [] if args.schemes == "none" else args.schemes.split(",")
    unknown = sorted(set(args.schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"--schemes: unknown {unknown}; allowed: {SCHEMES}")
    shipped = {path.stem: path for path in sorted(RECIPES.glob("*.yaml"))}
    if args.recipes == "all":
        args.recipes = list(shipped.values())
    elif args.recipes == "none":
        args.recipes = []
    else:
        names = [name.removesuffix(".yaml") for name in args.recipes.split(",")]
        missing = [name for name in names if name not in shipped]
        if missing:
            parser.error(f"--recipes: no {missing} in {RECIPES}; shipped: {sorted(shipped)}")
        args.recipes = [shipped[name] for name in names]
    sys.path.insert(0, str(REPO))
    from tests.models import FAMILIES

    quantizable = [name for name in FAMILIES if name != "gpt2"]
    if args.families in ("all", "none"):
        args.families = quantizable if args.families == "all" else []
    else:
        args.families = args.families.split(",")
        unknown = sorted(set(args.families) - set(quantizable))
        if unknown:
            parser.error(f"--families: unknown {unknown}; allowed: {quantizable}")
    return args


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from qep_modifier import QEPModifier  # also registers the modifier for the recipes
    from tests.models import group_scheme, quantize, save_tiny_family, save_tiny_llama, token_dataset

    work = args.out_dir
    model = save_tiny_llama(work / "tiny-fp")
    calibration = token_dataset(4, 32, seed=1)
    written = []
    for name in args.schemes:
        bits, kind = int(name[1]), name.split("-")[1]
        folder = work / f"w{bits}-g{args.group}-{kind}"
        modifier = QEPModifier(
            targets="Linear",
            ignore=["lm_head"],
            config_groups=group_scheme(
                bits, args.group, symmetric=kind != "asym", observer="full_range_mse" if kind == "full" else None
            ),
        )
        quantize(model, modifier, calibration, output_dir=str(folder))
        written.append(folder)
        print("wrote", folder, flush=True)
    for recipe in args.recipes:
        folder = work / f"recipe-{recipe.stem}"
        quantize(model, str(recipe), calibration, output_dir=str(folder))
        written.append(folder)
        print("wrote", folder, flush=True)
    for family in args.families:
        folder = work / f"family-{family}"
        source = save_tiny_family(work / f"tiny-{family}", family)
        modifier = QEPModifier(
            targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, args.group)
        )
        quantize(source, modifier, calibration, output_dir=str(folder))
        written.append(folder)
        print("wrote", folder, flush=True)
    return written


if __name__ == "__main__":
    main()
