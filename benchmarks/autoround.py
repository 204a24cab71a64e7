"""llm-compressor's AutoRoundModifier beside GPTQModifier and our recipes, in one process.

    python benchmarks/autoround.py --model DIR --rows w3g64:autoround,w3g64:spinquant_qep_refit2_tuned1,... \
        --output benchmarks/results/runs/autoround-h200.md --deadline 500

The protocol and the table are benchmarks/run.py's (same windows, same seed, same columns; the
methods are benchmarks/methods.yaml's rows, the AutoRound ones included). Rows run one after another in this
process, each on a model freshly loaded from disk; a row that raises is recorded as failed and
the next one runs. Differences from run.py:

- AutoRound's tuned layers come back in bfloat16 inside a float32 model wherever auto-round
  tunes in bf16 (a GPU; on a CPU without bf16 it keeps float32): every quantized model is
  cast to float32 before scoring (a no-op for the other methods).
- On a GPU the model is moved there for scoring, after oneshot's offloading is removed
  (calibration itself is oneshot's own: the sequential pipeline onloads each layer to the
  accelerator).
- A warm-up on a tiny random Llama runs each method family once before the first row (CUDA
  context, cuBLAS, Triton's GPTQ kernel), so the first measured row pays no start-up cost
  (``--no-warm-up`` skips it; then put the fp row first).
- ``--deadline SECONDS``: a row is skipped when the time left is less than its estimate (the
  measured time of an earlier row of the same kind, times 1.15); skipped rows are listed.
- ``autoround_eqtime``: AutoRound (batch 8) with ``iters`` chosen after the rows before it ran:
  200 x (time of our W3 recipe row) / (time of the default AutoRound row), same scheme
  (``--eqtime-iters N`` fixes it). On an H200 AutoRound costs about 3 s per decoder layer
  before its first iteration, so this lands well above our recipe's time
  (benchmarks/results/runs/autoround-h200.md).

AutoRound and asymmetric grids: AutoRoundModifier (llm-compressor 0.14.0.1) maps auto-round's
``scale`` to ``weight_scale`` but drops its ``zp``; the module keeps the zero point that
initialization registered (zeros), and auto-round's zero point is unsigned (codes 0..2^b-1,
w = s (q - zp)) while compressed-tensors' is signed (codes -2^(b-1)..2^(b-1)-1). Forward then
re-quantizes auto-round's weights on the wrong grid (clamped codes). ``autoround_zpfix*``
methods use the subclass from :func:`zero_point_fixed_modifier_class`, which stores
``zp - 2^(b-1)`` (and keeps the class name, which the pipeline tests). See
benchmarks/autoround_asym_repro.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# benchmarks/run.py (schemes, methods.yaml's methods, the table); BENCH_RUN_DIR: a frozen copy
sys.path.insert(0, os.environ.get("BENCH_RUN_DIR", str(Path(__file__).resolve().parent)))
import run  # noqa: E402


def zero_point_fixed_modifier_class():
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    base = AutoRoundModifier

    # The class keeps the name AutoRoundModifier: llm-compressor's sequential pipeline turns
    # propagate_error off only when `type(m).__name__ == "AutoRoundModifier"` (auto-round chains
    # its own quantized block outputs); under another name the pipeline would also propagate,
    # which changes the algorithm (and fails on a GPU: the tuned block is bfloat16).
    class AutoRoundModifier(base):
        """AutoRoundModifier that also hands auto-round's zero points to compressed-tensors,
        shifted from auto-round's unsigned convention to compressed-tensors' signed one."""

        def _postprocess_qparams(self, model, llmc_registered_qparams):
            zero_points = {}
            for name, module in model.named_modules():
                zp = getattr(module, "zp", None)
                scheme = getattr(module, "quantization_scheme", None)
                if (
                    isinstance(zp, torch.Tensor)
                    and scheme is not None
                    and scheme.weights is not None
                    and not scheme.weights.symmetric
                    and "weight_zero_point" in llmc_registered_qparams.get(name, {})
                ):
                    zero_points[name] = zp - 2 ** (scheme.weights.num_bits - 1)
            super()._postprocess_qparams(model, llmc_registered_qparams)
            from compressed_tensors.offload import update_offload_parameter

            for name, value in zero_points.items():
                module = model.get_submodule(name)
                target = module.weight_zero_point
                # through the offload cache (a module offloaded by the pipeline keeps it)
                update_offload_parameter(
                    module,
                    "weight_zero_point",
                    value.round().to(target.dtype).to(target.device).reshape(target.shape),
                )
                del module.zp

    AutoRoundModifier.__qualname__ = "AutoRoundModifier (zero points fixed)"
    return AutoRoundModifier


run.BENCHMARK_MODIFIERS["AutoRoundModifierZeroPointsFixed"] = zero_point_fixed_modifier_class


def autoround_method(note: str, **fields) -> "run.Method":
    """A methods.yaml-shaped row of AutoRoundModifier with ``fields`` (torch.compile off)."""
    return run.Method("autoround_custom", note, [{"AutoRoundModifier": {"enable_torch_compile": False, **fields}}])


def build(method: "run.Method", weights: dict):
    """The method's modifiers; ``AUTOROUND_TEST_ITERS`` (smoke tests only) shrinks AutoRound's
    iterations to a tiny budget."""
    modifiers = method.build(weights)
    if modifiers and os.environ.get("AUTOROUND_TEST_ITERS"):
        for modifier in modifiers:
            if type(modifier).__name__ == "AutoRoundModifier":
                modifier.iters = int(os.environ["AUTOROUND_TEST_ITERS"])
    return modifiers


#: what autoround_eqtime matches: our recipe per scheme
EQTIME_REFERENCE = {"w3g64": "spinquant_qep_refit2_tuned1", "w3g64a": "spinquant_qep_refit3_tuned1"}


def kind(method: str) -> str:
    """Rows of one kind take about the same time (for the deadline estimate)."""
    return method


def estimate_seconds(method: str, seconds: dict[str, float]) -> float:
    """A row's expected time: 1.15 x an earlier row of the same method; else the longest
    earlier row of its family (AutoRound or not); else 0 (nothing measured yet)."""
    if method in seconds:
        return 1.15 * seconds[method]
    family = [value for key, value in seconds.items()
              if ":" not in key and key.startswith("autoround") == method.startswith("autoround")]
    return max(family, default=0.0)


def warm_up(device_note: str) -> None:
    """Each method family once on a tiny random Llama (not timed in any row)."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    from models import save_tiny_llama, token_dataset

    from qep_modifier.workflow import quantize

    folder = Path(tempfile.mkdtemp()) / "tiny"
    save_tiny_llama(folder)
    data = token_dataset(4, 64, 0)
    start = time.perf_counter()
    for method in ("gptq_best", "spinquant_qep_refit2_tuned1", "autoround_i50_b2"):
        row = run.METHODS[method]
        if method.startswith("autoround"):
            row = autoround_method("warm-up", iters=2, batch_size=2)
        recipe = build(row, run.SCHEMES["w3g64"])
        try:
            model = quantize(folder, recipe, data, **row.oneshot)
            del model
        except Exception:  # noqa: BLE001 - the rows will say it again
            print(f"WARMUP {method} failed:\n{traceback.format_exc()}", flush=True)
    print(f"WARMUP done in {time.perf_counter() - start:.1f} s ({device_note})", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", type=Path, default=run.SHARED / "wiki_calib.txt")
    parser.add_argument("--eval", type=Path, default=run.SHARED / "wiki_eval.txt")
    parser.add_argument("--cross-eval", type=Path, default=None)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=30)
    parser.add_argument("--cross-eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", required=True, help="comma list of scheme:method (fp for full precision)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=None, help="seconds from start after which no row starts")
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eqtime-iters", type=int, default=None, help="fix autoround_eqtime's iters")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_wanted = []
    for item in args.rows.split(","):
        scheme, _, method = item.partition(":")
        if method == "":
            scheme, method = "-", scheme
        if method != "autoround_eqtime" and method not in run.METHODS:
            parser.error(f"unknown method {method}")
        if method != "fp" and scheme not in run.SCHEMES:
            parser.error(f"unknown scheme {scheme}")
        rows_wanted.append((scheme, method))

    from transformers import AutoTokenizer

    from qep_modifier.workflow import calibration_windows, load_causal_lm, quantize, score, scoring_windows

    cuda = torch.cuda.is_available()
    device_note = f"CUDA {torch.cuda.get_device_name()}" if cuda else "no GPU"
    model_path = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration = calibration_windows(tokenizer, args.calib, args.num_samples, args.seq_len, seed=args.seed)
    windows = scoring_windows(tokenizer, args.eval, args.seq_len, args.eval_windows)
    cross = None if args.cross_eval is None else scoring_windows(tokenizer, args.cross_eval, args.seq_len, args.cross_eval_windows)
    if not args.no_warm_up:
        warm_up(device_note)

    command = "python benchmarks/autoround.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# {model_path.name}: AutoRoundModifier, GPTQModifier and QEP recipes side by side\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {run.machine_line(device_note)}  \n"
        f"Calibration: {args.num_samples} x {args.seq_len} tokens of {args.calib.name} (seed {args.seed}); "
        f"evaluation: {windows.shape[0]} x {args.seq_len} tokens of {args.eval.name}"
        + ("" if cross is None else f"; ppl_cross: {cross.shape[0]} x {args.seq_len} of {args.cross_eval.name}")
        + ".  \n"
        "All rows in one process, one after another, each on a freshly loaded float32 model; calib_s is "
        "the wall time of oneshot (model load included) on this machine"
        + (" (GPU: the sequential pipeline onloads each layer to it)" if cuda else "")
        + "; quantized models are cast to float32 before scoring. "
        "gap_recovered is against stock GPTQModifier (`gptq`) of the same scheme, where present."
    )
    rows, skipped, failed = [], [], []
    seconds: dict[str, float] = {}
    for scheme, method in rows_wanted:
        elapsed_total = time.perf_counter() - begin
        estimate = estimate_seconds(method, seconds)
        if method == "autoround_eqtime":
            reference = seconds.get(f"{scheme}:{EQTIME_REFERENCE.get(scheme, '')}")
            default = seconds.get(f"{scheme}:autoround")
            if args.eqtime_iters:
                iters = args.eqtime_iters
            elif reference is None or default is None:
                print(f"SKIP {scheme} {method}: needs the default AutoRound row and our recipe's row first", flush=True)
                skipped.append(f"{scheme}:{method}")
                continue
            else:
                iters = max(1, round(200 * reference / default))
                if iters >= 200:
                    print(f"SKIP {scheme} {method}: our recipe took no less than the default AutoRound row", flush=True)
                    skipped.append(f"{scheme}:{method} (not needed)")
                    continue
            estimate = (default or 0.0) * iters / 200
            row = autoround_method(
                f"AutoRoundModifier, iters {iters} (time of {EQTIME_REFERENCE.get(scheme)}), batch 8, compile off",
                iters=iters,
            )
        else:
            row = run.METHODS[method]
            if row.scheme is not None and row.scheme != scheme:
                print(f"SKIP {scheme} {method}: written for {row.scheme}", flush=True)
                skipped.append(f"{scheme}:{method} (scheme)")
                continue
        note = row.note
        if args.deadline is not None and elapsed_total + estimate > args.deadline:
            print(f"SKIP {scheme} {method}: {elapsed_total:.0f} s gone, estimate {estimate:.0f} s", flush=True)
            skipped.append(f"{scheme}:{method}")
            continue
        print(f"== {scheme} {method}: {note} (at {elapsed_total:.0f} s)", flush=True)
        try:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with run.PeakRSS() as memory:
                recipe = None if method == "fp" else build(row, run.SCHEMES[scheme])
                if recipe is None:
                    model = load_causal_lm(model_path)
                else:
                    model = quantize(model_path, recipe, calibration, **row.oneshot)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            try:  # oneshot leaves the modules offloaded (CPU, onloaded per forward): undo that,
                # else a cast or a move only touches the onloaded copies (the quantized forward stays)
                from compressed_tensors.offload import remove_dispatch

                remove_dispatch(model)
            except ImportError:
                pass
            model = model.to(torch.float32)
            if cuda:
                model = model.to("cuda")
            ppl = score(model, windows)
            row = run.result_row(scheme, method, ppl, recipe is not None, elapsed, memory, note,
                                 None if cross is None else score(model, cross))
            rows.append(row)
            seconds[kind(method)] = elapsed
            seconds[f"{scheme}:{method}"] = elapsed
            print(f"RESULT {json.dumps(row)} dtypes_before_cast={dtypes}", flush=True)
            run.write_table(rows, args.output, header)
            del model
        except Exception:  # noqa: BLE001 - record and go on
            print(f"FAILED {scheme} {method}:\n{traceback.format_exc()}", flush=True)
            failed.append(f"{scheme}:{method}")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    note_lines = []
    if skipped:
        note_lines.append(f"Skipped (time): {', '.join(skipped)}.")
    if failed:
        note_lines.append(f"Failed: {', '.join(failed)}.")
    if note_lines:
        header += "  \n" + " ".join(note_lines)
    run.write_table(rows, args.output, header)
    print(args.output.read_text())
    print(f"TOTAL {time.perf_counter() - begin:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
