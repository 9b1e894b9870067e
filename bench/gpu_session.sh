#!/usr/bin/env bash
# One device-machine lease: build the CUDA module, run the cuda tests, then the GPU benchmarks in
# order of how much the open issues need them, each capped so the whole stays inside one call.
# Usage (on the device machine, repo root): bash bench/gpu_session.sh [BUDGET_SECONDS]
# Wheels the image lacks (nibabel, monai, diffusers...) travel in .whl/ (`bash bench/gpu_wheels.sh`
# here fetches them; the call carries ".whl"); results land in bench/results/*-nvidia-*.json and,
# when $OUT is set, in $OUT/results.tgz with the logs, and $OUT/summary.txt.
set -u
BUDGET=${1:-560}
START=$(date +%s)
OUT=${OUT:-/tmp/ldmfast-gpu-out}
LOGS=/tmp/ldmfast-gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

save_results() {
  # Few files come back from a lease: one archive of the results and logs, the summary beside it.
  tar czf "$OUT/results.tgz" bench/results/*nvidia* "$LOGS" 2>/dev/null || true
}

# stage NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, what is left), log to $OUT.
stage() {
  local name=$1 cap=$2; shift 2
  local t; t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 15 )); then echo "SKIP $name (budget spent)" | tee -a "$OUT/summary.txt"; return; fi
  local s=$(date +%s)
  timeout -k 5 "$t" "$@" >> "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (cap ${t}s)" | tee -a "$OUT/summary.txt"
  save_results
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/summary.txt"

export LDMFAST_CUDA=on LDMFAST_CUDA_ARCHITECTURES=90a CMAKE_BUILD_PARALLEL_LEVEL=16
stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import ldmfast._cuda as m; print('ldmfast._cuda', m.__file__)" 2>&1 | tee -a "$OUT/summary.txt"

# STAGES picks and orders what runs after the build (default: all, in this order).
STAGES=${STAGES:-"pytest_cuda profile_group_norm bench_group_norm bench_attention profile_attention sweep_attention bench_vqgan bench_synthesis bench_posttrain profile_posttrain bench_accelerate profile_accelerate bench_ddim bench_metrics bench_synthesize"}
for s in $STAGES; do
  case $s in
    # PYTEST_K="group_norm or accelerate" runs a subset.
    pytest_cuda) stage pytest_cuda 170 python3 -m pytest -m cuda -q -n 16 -p no:cacheprovider --maxfail=30 \
                   ${PYTEST_K:+-k "$PYTEST_K"} tests
                 tail -n 40 "$LOGS/pytest_cuda.log" >> "$OUT/summary.txt" ;;
    profile_group_norm) stage $s 40 python3 bench/profile_group_norm.py
                        cat "$LOGS/profile_group_norm.log" >> "$OUT/summary.txt" ;;
    profile_attention) stage $s 60 python3 bench/profile_attention.py ${PROFILE_SHAPES:+--shapes "$PROFILE_SHAPES"}
                       cat "$LOGS/profile_attention.log" >> "$OUT/summary.txt" ;;
    profile_accelerate) stage $s 60 python3 bench/profile_accelerate.py --host --models "${PROFILE_MODELS:-monai-unet,openai-unet}"
                        cat "$LOGS/profile_accelerate.log" >> "$OUT/summary.txt" ;;
    bench_group_norm) stage $s 80 python3 bench/bench_group_norm.py --device cuda --min-run-time 0.1 ;;
    # SWEEP_GN_ONLY="fused_backward,l2_chunk_bytes" times only those settings against the default.
    sweep_group_norm) stage $s 120 python3 bench/sweep_group_norm_cuda.py --out "$LOGS/sweep_group_norm.json" \
                        ${SWEEP_GN_ONLY:+--only "$SWEEP_GN_ONLY"}
                      grep -a "^setting\|^    {" "$LOGS/sweep_group_norm.log" >> "$OUT/summary.txt" ;;
    bench_attention) stage $s 120 python3 bench/bench_attention.py --device cuda --min-run-time 0.1 ;;
    sweep_attention) stage $s 150 python3 bench/sweep_attention_triton.py --out "$LOGS/sweep_attention.json"
                     grep -v "^    " "$LOGS/sweep_attention.log" >> "$OUT/summary.txt" ;;
    bench_vqgan) stage $s 40 python3 bench/bench_vqgan.py --device cuda --min-run-time 0.3 ;;
    # 18 sampling calls of 50 steps at batch 48 (fp32 eager among them): it ran past 150 s on an H200.
    bench_synthesis) stage $s 300 python3 bench/bench_synthesis_throughput.py --device cuda --repeats 1 ;;
    # POSTTRAIN_ARGS="--max-batch --max-batch-variants naive,decoder_ckpt,lean_8bit" adds the largest-batch
    # search (a few steps per variant at batches of hundreds); ACCEL_MODELS="monai-unet,..." a subset.
    bench_posttrain) stage $s 300 python3 bench/bench_posttrain.py --device cuda --rounds 5 ${POSTTRAIN_ARGS:-} ;;
    profile_posttrain) stage $s 90 python3 bench/profile_posttrain.py ${PROFILE_VARIANTS:+--variants "$PROFILE_VARIANTS"}
                       cat "$LOGS/profile_posttrain.log" >> "$OUT/summary.txt" ;;
    bench_accelerate) stage $s 170 python3 bench/bench_accelerate.py --device cuda --dtype bfloat16 --min-run-time 0.3 \
                        ${ACCEL_MODELS:+--models "$ACCEL_MODELS"} ;;
    bench_ddim) stage $s 25 python3 bench/bench_ddim.py --device cuda --min-run-time 0.1 ;;
    bench_metrics) stage $s 25 python3 bench/bench_metrics.py --device cuda --min-run-time 0.3 ;;
    bench_synthesize) stage $s 40 python3 bench/bench_synthesize.py --device cuda --repeats 2 ;;
    *) echo "unknown stage $s" | tee -a "$OUT/summary.txt" ;;
  esac
done
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
