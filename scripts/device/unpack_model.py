"""Rebuild the float32 HF folder of SmolLM2-135M-Instruct from pack_model.py's two parts.

    python unpack_model.py SRC_DIR OUT_DIR   (SRC_DIR holds model_a.npz, model_b.npz, model_meta/)

Arithmetic as gguf-py's dequantize_blocks (float32: d * q + m for Q4_1, q * d for Q8_0), so the
weights are bit-identical to qep_modifier.default_model's conversion.
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def main(src: Path, out: Path):
    a = np.load(src / "model_a.npz") if (src / "model_a.npz").is_file() else np.load(os.environ["MODEL_A"])
    b = np.load(src / "model_b.npz")
    tensors = {}
    for name in a.files:
        nibbles = a[name]  # [out, blocks, 16]
        q = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2).reshape(nibbles.shape[0], nibbles.shape[1], 32)
        d = b[name + ".d"].astype(np.float32)[..., None]
        m = b[name + ".m"].astype(np.float32)[..., None]
        tensors[name] = ((d * q.astype(np.float32)) + m).reshape(nibbles.shape[0], -1)
    rows, width = (int(x) for x in b["embed.shape"])
    embed = b["embed.q"].astype(np.float32) * b["embed.d"].astype(np.float32)[:, None]
    tensors["model.embed_tokens.weight"] = embed.reshape(rows, width)
    for name in b.files:
        if name.endswith("norm.weight"):
            tensors[name] = b[name]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    for item in (src / "model_meta").iterdir():
        shutil.copy(item, out / item.name)
    print(f"rebuilt {out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
