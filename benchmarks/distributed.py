"""One process against two: QEP calibration under torch.distributed on this machine.

    python benchmarks/distributed.py --recipe recipes/w3a16_qep_gptq.yaml

Runs ``examples/distributed_oneshot.py`` under ``torchrun`` with 1 and with 2
processes (threads split: the machine's cores over the processes), on the same
calibration windows (32 x 512 of wiki_calib, seed 0; each rank a contiguous
shard), then scores both checkpoints on the same evaluation windows. Per world
size: calibration time (the slowest rank), peak RSS per process, perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bench"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/w3a16_qep_gptq.yaml")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=30)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=REPO / "out" / "distributed")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "distributed.md")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from qep_modifier.default_model import default_model_path
    from qep_modifier.workflow import load_causal_lm, quiet_loading, score, scoring_windows

    rows = []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        output = args.work / f"world{world_size}"
        threads = max(1, args.cores // world_size)
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world_size}", str(REPO / "examples" / "distributed_oneshot.py"),
            "--recipe", args.recipe, "--num-samples", str(args.num_samples),
            "--seq-len", str(args.seq_len), "--output", str(output), "--overwrite",
        ]
        print("==", " ".join(command[2:]), flush=True)
        run = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stdout[-3000:] + run.stderr[-3000:])
        ranks = [json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("RANK ")]
        rows.append(dict(world_size=world_size, threads=threads, output=output,
                         calib_s=max(r["calib_s"] for r in ranks),
                         peak_rss_gib=[round(r["peak_rss_gib"], 2) for r in sorted(ranks, key=lambda r: r["rank"])]))

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    windows = scoring_windows(tokenizer, SHARED / "wiki_eval.txt", args.seq_len, args.eval_windows)
    torch.set_num_threads(args.cores)
    for row in rows:
        with quiet_loading():
            row["ppl"] = score(load_causal_lm(row["output"]), windows)
        print(row, flush=True)

    lines = [
        "# QEP calibration: one process against several",
        "",
        f"Command: `python benchmarks/distributed.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
        f"Machine: {platform.machine()}, {args.cores} cores, no GPU (gloo). SmolLM2-135M-Instruct, "
        f"{args.recipe}, {args.num_samples} x {args.seq_len} tokens of wiki_calib.txt (seed 0), "
        f"split into contiguous shards; perplexity on {windows.shape[0]} x {args.seq_len} of "
        "wiki_eval.txt (checkpoints saved in bfloat16).",
        "",
        "| processes | threads each | calibration s (slowest rank) | peak RSS GiB per process | ppl |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['world_size']} | {row['threads']} | {row['calib_s']:.0f} | "
                     f"{', '.join(map(str, row['peak_rss_gib']))} | {row['ppl']:.4f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
