#!/usr/bin/env bash
# Check that vLLM would load this project's compressed checkpoints.
#
#   scripts/check_vllm.sh                 # tiny checkpoints: 4, 3, 2 bits, sym and asym, every recipe
#   scripts/check_vllm.sh out/smol-w3 ... # or the checkpoints named
#
# vLLM 0.33 pins torch and compressed-tensors versions that clash with llm-compressor's,
# so it lives in its own virtual environment, made once (about 9 GB) and cached in
#   ${QEP_VLLM_ENV:-$HOME/.cache/qep-modifier/vllm-env}
# The checkpoints are written with THIS project's environment (${QEP_PYTHON:-.venv/bin/python});
# qep_modifier/vllm_check.py then runs in the vLLM environment, as a file path, so that
# it does not import the qep_modifier package (whose __init__ imports llm-compressor).
#
# Environment: QEP_VLLM_ENV (vLLM venv), QEP_PYTHON (project python), QEP_VLLM_GROUP
# (group size of the tiny checkpoints, default 32), QEP_VLLM_KEEP=1 (keep the tiny
# checkpoints; their folder is printed), PYTHON (the python3 that makes the venv),
# QEP_VLLM_CPU=1 (make a CPU-only vLLM environment instead, about 3.7 GB and no CUDA build:
# torch 2.13.0 CPU in place of vLLM's pinned 2.14.0, vLLM itself without its requirements,
# then the Python packages vLLM imports on the way to its loader classes, GPU kernel
# packages left out. Enough for this check, which creates parameters and runs no kernel;
# default QEP_VLLM_ENV then ~/.cache/qep-modifier/vllm-env-cpu).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CPU_ONLY="${QEP_VLLM_CPU:-0}"
ENV_SUFFIX=""
if [[ "$CPU_ONLY" == 1 ]]; then ENV_SUFFIX="-cpu"; fi
VLLM_ENV="${QEP_VLLM_ENV:-$HOME/.cache/qep-modifier/vllm-env$ENV_SUFFIX}"
PROJECT_PY="${QEP_PYTHON:-$REPO/.venv/bin/python}"
GROUP="${QEP_VLLM_GROUP:-32}"
VLLM_SPEC="vllm==0.33.*"

# ---------------------------------------------------------------- the vLLM environment
if [[ ! -f "$VLLM_ENV/.qep-ready" ]]; then
    echo "== creating the vLLM environment in $VLLM_ENV (once; $VLLM_SPEC, ~9 GB, or ~3.7 GB with QEP_VLLM_CPU=1)"
    mkdir -p "$(dirname "$VLLM_ENV")"
    "${PYTHON:-python3}" -m venv "$VLLM_ENV"
    "$VLLM_ENV/bin/python" -m pip install --upgrade pip
    if [[ "$CPU_ONLY" == 1 ]]; then
        echo "== QEP_VLLM_CPU=1: torch 2.13.0 (CPU), $VLLM_SPEC without its requirements, then what it imports"
        "$VLLM_ENV/bin/python" -m pip install torch==2.13.0
        "$VLLM_ENV/bin/python" -m pip install --no-deps "$VLLM_SPEC"
        "$VLLM_ENV/bin/python" -m pip install "compressed-tensors==0.17.0" "transformers>=5.16.1,<5.21" \
            regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo \
            huggingface_hub tokenizers safetensors protobuf "fastapi[standard]<0.137.0,>=0.133.0" \
            "starlette>=1.0.1" aiohttp multidict openai "pydantic>=2.12" orjson prometheus_client \
            pillow prometheus-fastapi-instrumentator tiktoken "lm-format-enforcer==0.11.3" \
            "outlines_core==0.2.14" "lark==1.2.2" typing_extensions filelock partial-json-parser \
            jsonschema pyzmq msgspec "mistral_common[image]" pyyaml einops "depyf==0.20.0" \
            cloudpickle watchfiles python-json-logger pybase64 cbor2 ijson setproctitle anthropic \
            "llguidance<1.8.0,>=1.7.0" "xgrammar==0.2.8" "oss-harmony>=0.0.11" "mcp<3.0.0,>=2.2.0" \
            "model-hosting-container-standards<1.0.0,>=0.1.14" opentelemetry-sdk opentelemetry-api \
            opentelemetry-exporter-otlp opentelemetry-semantic-conventions-ai ninja "numba==0.65.0"
    elif ! "$VLLM_ENV/bin/python" -m pip install "$VLLM_SPEC"; then
        # vLLM 0.33.0 asks for certifi>=2026.10.19, newer than some package mirrors
        # carry; certifi (a CA bundle) plays no part in this offline check. Install
        # vLLM without its requirements, then its requirements with certifi unpinned.
        echo "== plain install failed; installing $VLLM_SPEC with certifi unpinned"
        WHEELS="$(mktemp -d)"
        "$VLLM_ENV/bin/python" -m pip download --no-deps "$VLLM_SPEC" -d "$WHEELS"
        unzip -p "$WHEELS"/vllm-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' \
            | grep -v 'extra ==' | sed 's/;.*$//' | grep -vi '^certifi' > "$WHEELS/requirements.txt"
        echo certifi >> "$WHEELS/requirements.txt"
        "$VLLM_ENV/bin/python" -m pip install --no-deps "$WHEELS"/vllm-*.whl
        "$VLLM_ENV/bin/python" -m pip install -r "$WHEELS/requirements.txt"
        rm -rf "$WHEELS"
    fi
    VLLM_TARGET_DEVICE=cpu "$VLLM_ENV/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, 'in', sys.prefix)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig"
    touch "$VLLM_ENV/.qep-ready"   # only after a complete, importable install
fi
VLLM_PY="$VLLM_ENV/bin/python"

# ---------------------------------------------------------------- the checkpoints
CHECKPOINTS=("$@")
if [[ ${#CHECKPOINTS[@]} -eq 0 ]]; then
    if [[ ! -x "$PROJECT_PY" ]]; then
        echo "no project python at $PROJECT_PY: make .venv (see README) or set QEP_PYTHON" >&2
        exit 2
    fi
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/qep-vllm-check.XXXXXX")"
    if [[ "${QEP_VLLM_KEEP:-0}" != 1 ]]; then
        trap 'rm -rf "$WORK"' EXIT
    fi
    echo "== writing tiny checkpoints (schemes at group $GROUP, every shipped recipe) to $WORK with $PROJECT_PY"
    "$PROJECT_PY" "$REPO/scripts/vllm_checkpoints.py" "$WORK" --group "$GROUP" \
        > "$WORK/quantize.log" 2>&1 || { cat "$WORK/quantize.log" >&2; exit 2; }
    while read -r _ folder; do
        CHECKPOINTS+=("$folder")
    done < <(grep '^wrote ' "$WORK/quantize.log")
fi

# ---------------------------------------------------------------- the check
# one process for all of them: importing vLLM is the slow part
VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}" \
    "$VLLM_PY" "$REPO/qep_modifier/vllm_check.py" "${CHECKPOINTS[@]}"
