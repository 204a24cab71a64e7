"""How calibration cost grows with the model: GPTQModifier vs QEPModifier.

    python benchmarks/scaling.py --widths 576,1024,2048 --layers 4 --num-samples 16

Synthetic Llama configurations (random weights, hidden width W, intermediate
~2.67 W, head dim 64, 3:1 grouped-query attention), the same random-token
calibration samples for every row, W3 g64 weight-only on every Linear but
``lm_head``. Each (width, method) runs in a fresh process, so its peak resident
memory is its own; the table gives calibration time, its ratio to
GPTQModifier's at the same width (same run, same samples, same threads), peak
RSS, and the RSS added during calibration (peak minus the RSS after loading).
The table (Markdown) is written to ``--output`` after every row.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "gptq": "GPTQModifier (stock)",
    "qep": "QEPModifier (defaults)",
    "qep_lean": "QEPModifier, cache_full_precision_inputs and resume_replays off",
}


def _config(width: int, layers: int):
    from transformers import LlamaConfig

    heads = width // 64
    kv_heads = max(1, heads // 3)
    while heads % kv_heads:
        kv_heads -= 1
    return LlamaConfig(
        vocab_size=8192,
        hidden_size=width,
        intermediate_size=int(round(width * 8 / 3 / 64)) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _modifier(method: str):
    weights = {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    common = dict(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
    )
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(**common)
    from qep_modifier import QEPModifier

    lean = dict(cache_full_precision_inputs=False, resume_replays=False) if method == "qep_lean" else {}
    return QEPModifier(**common, **lean)


def run_one(width: int, layers: int, method: str, num_samples: int, seq_len: int, threads: int) -> dict:
    """Build the model, calibrate, return the measurements (in this process)."""
    import psutil
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from tests.models import word_level_tokenizer

    from qep_modifier.workflow import quantize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix=f"scaling-{width}-"))
    LlamaForCausalLM(_config(width, layers)).save_pretrained(folder)
    word_level_tokenizer(8192).save_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(3, 8192, (num_samples, seq_len), generator=generator)
    dataset = Dataset.from_dict(
        {"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()}
    )
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    quantize(folder, _modifier(method), dataset)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(width=width, method=method, calib_s=seconds, peak_rss_gib=peak / 2**30,
                added_gib=max(0, peak - before) / 2**30)


def write_table(rows: list[dict], path: Path, header: str) -> None:
    lines = [header, "", "| width | method | calib s | x GPTQModifier | peak RSS GiB | added during calibration GiB |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        base = next((r["calib_s"] for r in rows if r["width"] == row["width"] and r["method"] == "gptq"), None)
        ratio = "" if base is None else f"{row['calib_s'] / base:.2f}"
        lines.append(
            f"| {row['width']} | {METHODS[row['method']]} | {row['calib_s']:.0f} | {ratio} | "
            f"{row['peak_rss_gib']:.2f} | {row['added_gib']:.2f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="576,1024,2048")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="gptq,qep")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "scaling.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # width:method, in a child
    args = parser.parse_args(argv)
    if args.one:
        width, method = args.one.split(":")
        print("RESULT " + json.dumps(run_one(int(width), args.layers, method, args.num_samples, args.seq_len, args.threads)))
        return []
    methods = args.methods.split(",")
    for method in methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown {method!r}; allowed: {', '.join(METHODS)}")
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        "# Calibration cost against model width\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {platform.machine()}, {args.threads} threads, no GPU. Synthetic Llama, "
        f"{args.layers} layers, W3 g64; {args.num_samples} x {args.seq_len} random tokens, the same for every row; "
        "each row in its own process."
    )
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        for method in methods:
            print(f"== width {width} {method}", flush=True)
            child = subprocess.run(
                [sys.executable, __file__, "--one", f"{width}:{method}", "--layers", str(args.layers),
                 "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
                 "--threads", str(args.threads)],
                capture_output=True, text=True, cwd=REPO,
            )
            result = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not result:
                raise SystemExit(f"width {width} {method} failed:\n{child.stderr[-3000:]}")
            rows.append(json.loads(result[-1][len("RESULT "):]))
            print(rows[-1], flush=True)
            write_table(rows, args.output, header)
    print(args.output.read_text())
    return rows


if __name__ == "__main__":
    main()
