# call 1: keep part A, install the wheels, smoke-test on a tiny model
mkdir -p /tmp/model_a && cp .gpu/a/model_a.npz /tmp/model_a/ && ls -la /tmp/model_a
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
TE=$(python3 -c "import importlib.metadata as m; print(m.version('typing_extensions'))" 2>/dev/null)
echo "device typing_extensions $TE"
WHEELS=$(ls .whl/*.whl)
if python3 -c "import sys,importlib.metadata as m; v=tuple(int(x) for x in m.version('typing_extensions').split('.')[:2]); sys.exit(0 if v>=(4,16) else 1)"; then
  WHEELS=$(ls .whl/*.whl | grep -v typing_extensions); fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 BENCH_RUN_DIR=$PWD/.gpu/bin/frozen
timeout 150 python3 .gpu/bin/smoke.py 2>&1 | tee $OUT/log1 | grep -a -E "VERSION|RESULT|FAILED|SKIP|WARMUP|TOTAL|SMOKE|Traceback|Error|setup" | cut -c1-400
