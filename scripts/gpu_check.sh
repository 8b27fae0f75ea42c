#!/usr/bin/env bash
# Every GPU check of packvit in one call of a GPU machine, from the source tree:
#   1. `packvit info` (versions, backends usable there),
#   2. the CPU test suite under that machine's torch/transformers (and its torchvision/timm tests),
#   3. every GPU-marked test (attention backends, full-size parity, no host sync),
#   4. a short benchmark,
# then a summary. Usage: bash scripts/gpu_check.sh [all|tests|bench] [extra packvit bench args...]
# On an H200 `tests` takes about 7 minutes with a fresh checkpoint directory, and `bench` about 9 for
# the four full-size models: where one call is limited to 10 minutes, run `tests`, then
# `bench --models siglip2 dinov3` and `bench --models aimv2 llava_vit` (3-5 minutes each) as three
# calls; all reuse the checkpoints in $PACKVIT_CKPT_DIR.
set -u
cd "$(dirname "$0")/.."
stage=${1:-all}; shift || true
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-gpu_out}; mkdir -p "$out"
export PACKVIT_CKPT_DIR=${PACKVIT_CKPT_DIR:-/tmp/packvit-ckpts} PACKVIT_GPU_REPORT="$out/gpu_figures.jsonl"
rm -f "$PACKVIT_GPU_REPORT"
python=${PYTHON:-python3}
status=()

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  $python -m packvit info | tee "$out/info.txt"
  workers=$($python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  $python -m pytest -q -m "not gpu" $workers tests 2>&1 | tee "$out/cpu_tests.log" | tail -n 25
  status+=("cpu tests: $(tail -n 1 "$out/cpu_tests.log")")
  $python -m pytest -q -m gpu -s tests 2>&1 | tee "$out/gpu_tests.log" | grep -v '^FIGURES' | tail -n 40
  status+=("gpu tests: $(tail -n 1 "$out/gpu_tests.log")")
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  $python -m packvit bench --profile --ckpt_dir "$PACKVIT_CKPT_DIR" --out "$out/bench" "$@" 2>&1 | tee "$out/bench.log" | tail -n 30
  status+=("bench: $(tail -n 1 "$out/bench.log")")
fi

echo
echo "=== summary ==="
if [ -s "$PACKVIT_GPU_REPORT" ]; then
  $python - "$PACKVIT_GPU_REPORT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    t, first, pooled = r["tokens"], r["first_token"], r["pooled"]
    pooled_text = f"pooled cos min {pooled['min_cosine']:.6f} max|d| {pooled['max_diff']:.2e}" if pooled else "no pooled"
    print(f"{r['family']:9s} {r['workload']:6s} {r['dtype']:8s} items {r['items']:4d}  tokens: max|d| {t['max_diff']:.2e} "
          f"mean|d| {t['mean_diff']:.2e} cos min/mean {t['min_cosine']:.5f}/{t['mean_cosine']:.6f}  "
          f"first-token cos min {first['min_cosine']:.6f}  {pooled_text}")
PY
fi
[ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
printf '%s\n' "${status[@]}"
