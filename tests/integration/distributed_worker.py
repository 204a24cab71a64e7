"""One rank of the distributed tests (gloo on CPU), started by
``tests/integration/test_distributed.py`` as ``python -m tests.integration.distributed_worker``.

For each variant: load the tiny model, calibrate with ``oneshot`` on this rank's
samples (``batch_size=1``), save every quantized module's weight, scale and zero
point, every norm's weight and the error report to ``<output>/<variant>-rank<r>.pt`` (or, when
oneshot raises, the message to ``<variant>-rank<r>.error``).
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from tests.models import load_model, norm_weights, quantize, quantized_linears
from tests.integration.distributed_cases import CASES, samples_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True, help="file:// rendezvous")
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cases", required=True, help="comma-separated case names")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world_size)
    try:
        for name in args.cases.split(","):
            case = CASES[name]
            model = load_model(args.models / case.model)
            data = samples_of(case, args.rank)
            target = args.output / f"{name}-rank{args.rank}"
            modifier = case.recipe()
            try:
                quantized = quantize(model, modifier, data, batch_size=1, **case.oneshot)
                result = {
                    "weights": quantized_linears(quantized),
                    "norms": norm_weights(quantized),
                    "report": modifier.error_report,
                }
                torch.save(result, target.with_suffix(".pt"))
            except Exception as error:  # the test reads it
                target.with_suffix(".error").write_text(f"{error}\n{traceback.format_exc()}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
