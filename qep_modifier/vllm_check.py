"""Check that vLLM would accept a compressed checkpoint's quantized Linear tensors.

    python qep_modifier/vllm_check.py out/tiny-qep-w4 [more checkpoints]   # in an environment with vLLM

For every quantized Linear in the checkpoint (a ``<prefix>.weight_packed`` tensor in
its safetensors files), vLLM's own ``CompressedTensorsConfig`` (built from the
checkpoint's ``quantization_config``) picks the scheme it would load the layer
with, and the scheme creates that layer's parameters on an empty module, exactly
as vLLM's model loader would before copying the file's tensors in. Every created
parameter's name, dtype and shape is compared with the file's tensor of that
name: a missing, extra, reshaped or retyped tensor is printed on one line, and
the exit status is 1 if there is any. Nothing is run on a GPU; no kernel runs.

vLLM cannot be installed in this project's environment (it pins other torch and
compressed-tensors versions): ``scripts/check_vllm.sh`` makes a separate one and
runs this file there *as a file path*, which does not import the ``qep_modifier``
package (its ``__init__`` imports llm-compressor). So this module imports only the
standard library and safetensors at the top; torch and vLLM are imported inside
the functions that need them.

The comparison itself is the pure function :func:`compare_specs` over two specs
``{tensor_name: (dtype, shape)}``; :func:`read_checkpoint_spec` reads the file
side and :func:`vllm_expected_spec` asks vLLM for the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = [
    "compare_specs",
    "read_checkpoint_spec",
    "quantized_layers",
    "layer_sizes",
    "vllm_expected_spec",
    "main",
]

Spec = dict  # {tensor_name: (dtype_str, shape_tuple)}, e.g. {"x.weight_shape": ("int64", (2,))}

PACKED_SUFFIX = ".weight_packed"

# safetensors dtype codes -> the names torch uses (torch.float32 -> "float32")
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

VLLM_MISSING = (
    "vLLM is not installed in this Python environment ({python}).\n"
    "This check needs vLLM 0.33 in a separate environment (vLLM pins its own torch and "
    "compressed-tensors, which clash with llm-compressor's): run scripts/check_vllm.sh, "
    "or\n  python3 -m venv vllm-env && vllm-env/bin/pip install 'vllm==0.33.*'\n"
    "  VLLM_TARGET_DEVICE=cpu vllm-env/bin/python qep_modifier/vllm_check.py CHECKPOINT_DIR"
)


# ---------------------------------------------------------------- comparison (pure)


def _format(entry) -> str:
    dtype, shape = entry
    return f"{dtype} {list(shape)}"


def compare_specs(expected: Spec, actual: Spec) -> list[str]:
    """Mismatch lines between ``expected`` (vLLM) and ``actual`` (the file).

    Both map a tensor name to ``(dtype_str, shape_tuple)``. Returns one line per
    missing tensor (vLLM creates it, the file lacks it), extra tensor (in the
    file, vLLM creates no parameter for it), wrong shape and wrong dtype, sorted
    by tensor name; an empty list when the specs agree.
    """
    lines = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            lines.append(f"missing tensor: {name} (vLLM expects {_format(expected[name])})")
            continue
        if name not in expected:
            lines.append(
                f"extra tensor: {name} ({_format(actual[name])}; vLLM creates no such parameter)"
            )
            continue
        want_dtype, want_shape = expected[name]
        have_dtype, have_shape = actual[name]
        if tuple(want_shape) != tuple(have_shape):
            lines.append(
                f"wrong shape: {name}: file {list(have_shape)}, vLLM expects {list(want_shape)}"
            )
        if want_dtype != have_dtype:
            lines.append(f"wrong dtype: {name}: file {have_dtype}, vLLM expects {want_dtype}")
    return lines


# ---------------------------------------------------------------- the file side


def _safetensors_files(checkpoint: Path) -> list[Path]:
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        return [checkpoint]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {checkpoint}")
    return files


def read_checkpoint_spec(checkpoint: str | Path) -> Spec:
    """``{tensor_name: (dtype_str, shape_tuple)}`` of every tensor in a checkpoint.

    ``checkpoint`` is a folder (all its ``*.safetensors`` files, sharded or not)
    or one ``.safetensors`` file. Only the headers are read.
    """
    from safetensors import safe_open

    spec = {}
    for path in _safetensors_files(Path(checkpoint)):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                code = view.get_dtype()
                spec[name] = (_SAFETENSORS_DTYPES.get(code, code.lower()), tuple(view.get_shape()))
    return spec


def quantized_layers(spec: Spec) -> list[str]:
    """Prefixes of the quantized Linears: names ending in ``.weight_packed``."""
    return sorted(name[: -len(PACKED_SUFFIX)] for name in spec if name.endswith(PACKED_SUFFIX))


def layer_sizes(checkpoint: str | Path, prefixes=None) -> dict[str, tuple[int, int]]:
    """``{prefix: (out_features N, in_features K)}`` from each ``<prefix>.weight_shape``.

    compressed-tensors stores the unpacked weight's shape ``[N, K]`` beside the
    packed one.
    """
    from safetensors import safe_open

    sizes = {}
    for path in _safetensors_files(Path(checkpoint)):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                if not name.endswith(".weight_shape"):
                    continue
                prefix = name[: -len(".weight_shape")]
                if prefixes is not None and prefix not in prefixes:
                    continue
                out_features, in_features = (int(v) for v in handle.get_tensor(name).tolist())
                sizes[prefix] = (out_features, in_features)
    return sizes


def _layer_tensors(spec: Spec, prefixes) -> Spec:
    """The tensors that belong to the given Linear prefixes (``<prefix>.<param>``)."""
    wanted = set(prefixes)
    return {
        name: entry
        for name, entry in spec.items()
        if "." in name and name.rsplit(".", 1)[0] in wanted
    }


# ---------------------------------------------------------------- the vLLM side


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _import_vllm():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise SystemExit(VLLM_MISSING.format(python=sys.executable) + f"\n({error})") from None
    return vllm


def _init_single_process_group() -> None:
    """A one-process gloo group and vLLM's TP/PP groups of size 1.

    vLLM's parameter classes (``BasevLLMParameter``) read the tensor-parallel
    rank and size when they are created, so the groups must exist.
    """
    import torch
    from vllm.distributed import init_distributed_environment

    try:
        from vllm.distributed import ensure_model_parallel_initialized
    except ImportError:  # older layout
        from vllm.distributed.parallel_state import ensure_model_parallel_initialized

    if not torch.distributed.is_initialized():
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="gloo",
        )
    ensure_model_parallel_initialized(1, 1)


def _destroy_process_group() -> None:
    """Best effort: tear the groups down again (the process ends right after anyway)."""
    try:
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:
        pass


class _StubKernel:
    """Stands in for a kernel class when vLLM finds none on this platform.

    Schemes such as ``CompressedTensorsWNA16`` choose a kernel inside
    ``create_weights`` (after or before registering the parameters); the
    parameters themselves do not depend on which kernel is chosen, so the layout
    can still be compared.
    """

    def __init__(self, *args, **kwargs):
        pass


def _tolerate_missing_kernel(scheme, notes: list[str], prefix: str):
    """Make the scheme's module fall back to :class:`_StubKernel`; returns an undo."""
    module = sys.modules.get(type(scheme).__module__)
    original = getattr(module, "choose_mp_linear_kernel", None)
    if original is None:
        return lambda: None

    def choose(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as error:  # vLLM raises ValueError with the reasons
            reason = " ".join(str(error).split())
            notes.append((prefix, reason[:300]))
            return _StubKernel

    module.choose_mp_linear_kernel = choose
    return lambda: setattr(module, "choose_mp_linear_kernel", original)


def _get_scheme(quant_config, layer, prefix: str):
    if hasattr(quant_config, "get_scheme"):
        return quant_config.get_scheme(layer=layer, layer_name=prefix)
    # some vLLM versions moved the lookup to a module-level function
    from vllm.model_executor.layers.quantization.compressed_tensors import (
        compressed_tensors_linear,
    )

    return compressed_tensors_linear.get_scheme(quant_config, layer, prefix)


def _no_weight_loader(*args, **kwargs):  # parameters are never loaded here
    raise RuntimeError("vllm_check creates parameters only; it never loads weights")


def vllm_expected_spec(
    quantization_config: dict,
    sizes: dict[str, tuple[int, int]],
    params_dtype: str,
    biased: frozenset[str] = frozenset(),
):
    """The parameters vLLM creates for each quantized Linear.

    ``sizes`` maps each Linear prefix to ``(N, K)`` (out, in features);
    ``params_dtype`` is the model dtype vLLM would run in (``"float16"``, ...).
    Returns ``(expected_spec, problems, notes, schemes)``: ``problems`` are layers
    vLLM would not load at all (no scheme, or its ``create_weights`` failed),
    ``notes`` are ``(prefix, reason)`` for layers vLLM found no kernel for on
    this platform (the layout is still compared), ``schemes`` maps each layer whose
    parameters were created to its scheme's class name. ``biased``: the prefixes
    whose Linear has a bias (OPT, GPT-NeoX, Qwen2's q/k/v): vLLM's linear layer
    itself, not the scheme, creates ``bias`` for them, in ``params_dtype``, one
    per output feature.
    """
    _import_vllm()
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    dtype = getattr(torch, params_dtype)
    expected, problems, notes, schemes = {}, [], [], {}
    with set_current_vllm_config(VllmConfig()):
        _init_single_process_group()
        try:
            quant_config = CompressedTensorsConfig.from_config(quantization_config)
        except Exception as error:  # e.g. fields its compressed-tensors does not know
            problems.append(
                f"vLLM cannot read the quantization_config: {type(error).__name__}: {error}"
            )
            _destroy_process_group()
            return expected, problems, notes, schemes
        for prefix, (out_features, in_features) in sorted(sizes.items()):
            probe = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
            try:
                scheme = _get_scheme(quant_config, probe, prefix)
            except Exception as error:
                problems.append(f"no vLLM scheme: {prefix}: {type(error).__name__}: {error}")
                continue
            if scheme is None:
                problems.append(
                    f"not quantized by vLLM: {prefix}: vLLM's config ignores it or matches "
                    "no target, but the file has its weight_packed"
                )
                continue
            schemes[prefix] = type(scheme).__name__
            layer = torch.nn.Module()
            undo = _tolerate_missing_kernel(scheme, notes, prefix)
            try:
                scheme.create_weights(
                    layer=layer,
                    input_size=in_features,
                    input_size_per_partition=in_features,
                    output_partition_sizes=[out_features],
                    output_size=out_features,
                    params_dtype=dtype,
                    weight_loader=_no_weight_loader,
                )
            except Exception as error:
                problems.append(
                    f"vLLM cannot create {prefix} ({schemes.pop(prefix)}): "
                    f"{type(error).__name__}: {error}"
                )  # popped: its file tensors are not compared (they would all be "extra")
                continue
            finally:
                undo()
            for name, param in layer.named_parameters():
                expected[f"{prefix}.{name}"] = (
                    str(param.dtype).removeprefix("torch."),
                    tuple(param.shape),
                )
            if prefix in biased:
                expected[f"{prefix}.bias"] = (params_dtype, (out_features,))
        _destroy_process_group()
    return expected, problems, notes, schemes


# ---------------------------------------------------------------- command line


def _model_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float16"
    return str(dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qep-vllm-check",
        description="Check a compressed-tensors checkpoint against the parameters vLLM "
        "creates for it (needs vLLM; see scripts/check_vllm.sh).",
    )
    parser.add_argument(
        "checkpoints", type=Path, nargs="+", metavar="checkpoint",
        help="checkpoint folder(s) (config.json + safetensors), checked one after another in one process",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="model dtype vLLM runs in (scales are created in it); default: config.json's dtype",
    )
    parser.add_argument(
        "--require-kernel",
        action="store_true",
        help="also fail when vLLM finds no kernel for a layer on this machine "
        "(by default that is only reported: kernels depend on the GPU)",
    )
    args = parser.parse_args(argv)
    vllm = _import_vllm()  # first: without vLLM nothing below can be checked
    failed = []
    for index, checkpoint in enumerate(args.checkpoints):
        if len(args.checkpoints) > 1:
            print(("\n" if index else "") + f"== {checkpoint}", flush=True)
        if _check(vllm, checkpoint, args.dtype, args.require_kernel):
            failed.append(checkpoint)
    if len(args.checkpoints) > 1:
        print()
        if failed:
            print(f"{len(failed)} of {len(args.checkpoints)} checkpoints do not match vLLM:")
            print("\n".join(f"  {checkpoint}" for checkpoint in failed))
        else:
            print(f"all {len(args.checkpoints)} checkpoints match what vLLM creates")
    return 1 if failed else 0


def _check(vllm, checkpoint: Path, dtype_name: str | None, require_kernel: bool) -> int:
    """One checkpoint against vLLM: prints its problems and a verdict, returns 1 on any."""
    config = json.loads((checkpoint / "config.json").read_text())
    quantization_config = config.get("quantization_config")
    if not quantization_config:
        print(f"{checkpoint}/config.json has no quantization_config", file=sys.stderr)
        return 1
    actual_all = read_checkpoint_spec(checkpoint)
    prefixes = quantized_layers(actual_all)
    if not prefixes:
        print(f"no quantized Linear (*{PACKED_SUFFIX}) in {checkpoint}", file=sys.stderr)
        return 1
    sizes = layer_sizes(checkpoint, set(prefixes))
    problems = [f"missing tensor: {p}.weight_shape (needed for N, K)" for p in prefixes if p not in sizes]

    dtype = dtype_name or _model_dtype(config)
    biased = frozenset(prefix for prefix in prefixes if f"{prefix}.bias" in actual_all)
    expected, vllm_problems, notes, schemes = vllm_expected_spec(
        quantization_config, sizes, dtype, biased
    )
    problems += vllm_problems
    actual = _layer_tensors(actual_all, schemes)
    problems += compare_specs(expected, actual)
    if require_kernel:
        problems += [f"no vLLM kernel: {prefix}: {reason}" for prefix, reason in notes]
    else:
        reasons = {}
        for prefix, reason in notes:
            reasons.setdefault(reason, []).append(prefix)
        for reason, layers in reasons.items():
            print(
                f"note: vLLM has no kernel on this machine for {len(layers)} layer(s) "
                f"(e.g. {layers[0]}): {reason}; their layout was still checked"
            )
    for line in problems:
        print(line)

    names = ", ".join(sorted(set(schemes.values()))) or "none"
    fmt = quantization_config.get("format")
    if problems:
        print(
            f"FAIL: {len(problems)} problem(s); {len(prefixes)} quantized Linear layers in "
            f"{checkpoint} ({fmt}), vLLM {vllm.__version__}, scheme {names}"
        )
        return 1
    print(
        f"OK: vLLM {vllm.__version__} creates exactly the file's {len(expected)} tensors for "
        f"all {len(prefixes)} quantized Linear layers of {checkpoint} ({fmt}, scheme "
        f"{names}, dtype {dtype})"
    )
    return 0


if __name__ == "__main__":
    # Run as a file, this folder is sys.path[0]: drop it, so that the package's
    # modules (cli.py, ...) cannot shadow top-level modules vLLM imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    raise SystemExit(main())
