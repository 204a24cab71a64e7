"""Reproduce: AutoRoundModifier (llm-compressor 0.14.0.1, auto-round 0.15.1) loses its zero points
on asymmetric int grids. CPU, a tiny random Llama, seconds.

    python benchmarks/autoround_asym_repro.py

For every quantized Linear, auto-round leaves its own fake-quantized weight in ``weight``
(w = s (q - zp), q in 0..2^b-1) and llm-compressor maps auto-round's ``scale`` to
``weight_scale``, but it has no mapping for ``zp`` (``_postprocess_qparams``'s
``qparams_mapping``), so ``weight_zero_point`` keeps the zeros registered at initialization.
compressed-tensors' forward then fake-quantizes that weight again with zero point 0 on its
signed code range -2^(b-1)..2^(b-1)-1: every weight with q - zp outside that range is clamped.
The printed "forward vs auto-round" error is that re-quantization error (0 for a symmetric
grid; large for the stock asymmetric one; 0 with the fix, which stores zp - 2^(b-1)).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def check(symmetric: bool, fixed: bool, bits: int = 3) -> None:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.autoround import AutoRoundModifier
    from models import save_tiny_llama, token_dataset

    from autoround import zero_point_fixed_modifier_class

    folder = Path(tempfile.mkdtemp()) / "tiny"
    save_tiny_llama(folder)
    data = token_dataset(8, 64, 0)
    weights = dict(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=64)
    cls = zero_point_fixed_modifier_class() if fixed else AutoRoundModifier
    modifier = cls(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        iters=2,
        batch_size=2,
        enable_torch_compile=False,
    )
    model = oneshot(
        model=str(folder), dataset=data, recipe=modifier,
        num_calibration_samples=8, max_seq_length=64, shuffle_calibration_samples=False,
    )
    worst, zero_points = 0.0, set()
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        weight = module.weight.detach().float()
        args = module.quantization_scheme.weights
        zp = getattr(module, "weight_zero_point", None)
        with torch.no_grad():
            forward = fake_quantize(weight, module.weight_scale.float(), zp, args)
        worst = max(worst, ((forward - weight).abs().max() / weight.abs().max()).item())
        if zp is not None:
            zero_points.update(zp.unique().tolist())
    label = f"W{bits} g64 {'sym ' if symmetric else 'asym'} {'fixed' if fixed else 'stock'}"
    print(
        f"{label}: max |forward weight - auto-round's weight| / max|w| = {worst:.3f}; "
        f"zero points stored: {sorted(zero_points)[:10]}",
        flush=True,
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    check(symmetric=True, fixed=False)
    check(symmetric=False, fixed=False)
    check(symmetric=False, fixed=True)
