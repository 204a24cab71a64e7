"""QEP (or any recipe) with llm-compressor's oneshot on several processes.

    torchrun --nproc_per_node 2 examples/distributed_oneshot.py \\
        --recipe recipes/w3a16_qep_gptq.yaml --output out/smol-w3-ddp

One GPU per rank with NCCL where GPUs are there (the model is loaded offloaded to
CPU once and onloaded layer by layer); gloo on a CPU-only machine (every rank
shares one CPU copy of the weights). The calibration windows are drawn once
(same seed on every rank) and each rank takes its own contiguous shard: pass
every rank its own data, llm-compressor 0.14's automatic split gives every rank
the first shard when all pass the same dataset (QEPModifier refuses that). The
weights are bit for bit those of one process on the same samples for two ranks;
with more ranks the summation order of the statistics differs (rounding only).
Every rank takes part in saving (compressed-tensors compresses the model on all
ranks together); rank 0 writes the files and prints the error report. A rank that
waits at a collective longer than --timeout-min (another rank hung or died) ends
with one line naming the step it waited at.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, required=True, help="recipe YAML")
    parser.add_argument("--model", type=Path, default=None,
                        help="local model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--text", type=Path, default=BENCH / "wiki_calib.txt",
                        help="calibration text file (default: ../shared/bench/wiki_calib.txt)")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="calibration windows in all, split over the ranks (default: 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="window positions (default: 0)")
    parser.add_argument("--output", type=Path, required=True,
                        help="checkpoint folder, new or empty (rank 0 writes it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint folder at --output whole")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of the saved checkpoint (default: bfloat16)")
    parser.add_argument("--timeout-min", type=float, default=30.0,
                        help="minutes a rank waits at a collective for the others before it fails "
                        "naming the step (default: 30)")
    return parser.parse_args(argv)


def check_args(args, world_size: int) -> None:
    """One line, the same on every rank, before the process group starts."""
    if not (math.isfinite(args.timeout_min) and args.timeout_min > 0):
        raise SystemExit(f"--timeout-min {args.timeout_min}: must be a positive number of minutes")
    if args.num_samples < world_size:
        raise SystemExit(
            f"--num-samples {args.num_samples} is below the number of ranks ({world_size}): "
            "every rank needs at least one calibration window"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit(
            "run this under torchrun, e.g. torchrun --nproc_per_node 2 "
            "examples/distributed_oneshot.py --recipe ... --output ..."
        )
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    from qep_modifier import distributed
    from qep_modifier.distributed import CollectiveError
    from qep_modifier.workflow import InputError

    # NCCL with one GPU per rank where there is an accelerator, else gloo (compressed-tensors'
    # init_dist needs an accelerator and takes no timeout)
    try:
        distributed.init_process_group(args.timeout_min)
    except CollectiveError as error:  # a rank that never joined
        raise SystemExit(f"distributed_oneshot: {error}") from None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        from transformers import AutoModelForCausalLM

        from qep_modifier.cli import format_report
        from qep_modifier.default_model import default_model_folder, default_model_path
        from qep_modifier.workflow import (
            DTYPES,
            calibration_windows,
            check_output,
            load_recipe,
            load_tokenizer,
            one_line_errors,
            quantize,
            save_checkpoint,
        )

        # every rank reads the same answer: all stop here, or none
        with one_line_errors("distributed_oneshot.py"):
            check_output(args.output, args.overwrite, [args.model or default_model_folder()])
        model_path = args.model or default_model_path()
        tokenizer = load_tokenizer(model_path)
        windows = calibration_windows(tokenizer, args.text, args.num_samples, args.seq_len, args.seed)
        shard = windows.shard(num_shards=world_size, index=rank, contiguous=True)
        if torch.accelerator.is_available():
            from compressed_tensors.offload import load_offloaded_model

            with load_offloaded_model():
                model = AutoModelForCausalLM.from_pretrained(
                    model_path, dtype="auto", device_map="auto_offload"
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        recipe = load_recipe(args.recipe, report=True)
        if rank == 0:
            print(f"{world_size} ranks, {len(shard)} of {args.num_samples} windows each "
                  f"({args.seq_len} tokens, seed {args.seed})", flush=True)
        start = time.perf_counter()
        # the toolkit's own collectives (in oneshot, in the save) name no step: these do
        with distributed.waiting_at("calibrating (oneshot)"):
            model = quantize(model, recipe, shard, processor=tokenizer)
        seconds = time.perf_counter() - start
        distributed.barrier(step="the barrier after calibrating")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        # one write: torchrun runs the ranks unbuffered on one stdout, print's two writes interleave
        sys.stdout.write("RANK " + json.dumps({"rank": rank, "world_size": world_size, "calib_s": seconds,
                                               "peak_rss_gib": peak, "samples": len(shard)}) + "\n")
        sys.stdout.flush()
        # collective: compressed-tensors compresses on every rank, rank 0 writes
        with distributed.waiting_at("saving the checkpoint (every rank compresses)"):
            save_checkpoint(model, tokenizer, args.output, DTYPES[args.dtype], overwrite=args.overwrite)
        if rank == 0:
            print(f"saved compressed ({args.dtype}) to {args.output}")
            for modifier in recipe.modifiers:
                rows = getattr(modifier, "error_report", None)
                if rows:
                    print(format_report(rows))
        distributed.barrier(step="the last barrier (rank 0 prints the report)")
    except (InputError, CollectiveError) as error:  # one line per rank, no traceback
        raise SystemExit(f"distributed_oneshot (rank {rank}): {error}") from None
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
