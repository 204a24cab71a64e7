# call 2: rebuild the model, run the rows (one process, fresh model per row)
set -o pipefail
[ -f /tmp/model_a/model_a.npz ] && A=/tmp/model_a/model_a.npz || A=.gpu/a/model_a.npz
[ -d /tmp/smol ] && [ -z "$UNPACK" ] && SKIPUNPACK=1; [ -d /tmp/site/llmcompressor ] || { echo "NO /tmp/site: machine was not warm"; exit 4; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 BENCH_RUN_DIR=$PWD/.gpu/bin/frozen
T0=$(date +%s)
[ -n "$SKIPUNPACK" ] || MODEL_A=$A python3 .gpu/bin/unpack_model.py .gpu/b /tmp/smol || exit 5
echo "unpacked in $(( $(date +%s) - T0 )) s"
B=.gpu/b
ROWS=${ROWS:-fp,w3g64:autoround,w3g64:spinquant_qep_refit2_tuned1,w3g64:gptq_best,w3g64:autoround_eqtime,w4g64:autoround,w4g64:gptq_best,w4g64a:spinquant_qep_refit2_best,w2g64:autoround,w2g64:gptq_best,w2g64a:spinquant_qep_refit2_tuned3_lr0.01,w3g64a:autoround_zpfix,w3g64a:gptq_best,w3g64a:spinquant_qep_refit3_tuned1,w3g64:autoround_i50_b2,w3g64a:autoround,w4g64a:autoround_zpfix,w2g64a:autoround_zpfix,w3g64:autoround_compile}
timeout ${LIMIT:-520} python3 benchmarks/autoround.py --model /tmp/smol --calib $B/wiki_calib.txt --eval $B/wiki_eval.txt \
  --cross-eval $B/austen.txt --rows $ROWS --output $OUT/${NAME:-autoround-h200}.md --deadline ${DEADLINE:-470} ${EXTRA} 2>&1 | tee $OUT/log \
  | grep -a -E "RESULT|FAILED|SKIP|WARMUP|TOTAL|Traceback|Error|^== " | cut -c1-330
echo "rc=$? total $(( $(date +%s) - T0 )) s"
