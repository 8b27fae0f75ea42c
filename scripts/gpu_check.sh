#!/usr/bin/env bash
# Every GPU check of packvit, from the source tree, in stages that fit one call of a GPU machine each:
#
#   bash scripts/gpu_check.sh STAGE [STAGE ...] [-- extra arguments for the bench stage]
#
#   fa4-extract     unpack .fa4/'s CUDA library archive (FlashAttention 4, see ../shared/tools/fa4-carry.sh)
#                   to /opt/fa4libs, outside the working tree
#   fa4-install     install .fa4b/'s wheels into /opt/fa4site, then copy /opt/fa4libs over them (the
#                   other order leaves a cutlass package that pip --target skips: "No module named
#                   'cutlass.cute'")
#   info            versions and the attention backends usable there
#   checkpoints     the full-size random checkpoints every full-size test and benchmark reads
#   cpu-tests       the CPU suite under that machine's torch/transformers and torchvision (8 processes)
#   attention-tests every attention backend against the float32 reference, FA4's backward probe
#   model-tests     full-size parity, no host sync, batching independence, packing GPU tests
#   training-tests  gradient parity (full size included), checkpointing, compiled training, no host sync
#   graph-tests     the CUDA-graph mode's GPU tests
#   vlm-tests       LFM2-VL with packvit's tower: its real processor, host synchronisations
#   embed-tests     packvit embed on CUDA: the rows of a CUDA run, the GPU decode route against the CPU's,
#                   and the processors' device path
#   fp8-tests       FP8 inference: full-size parity and speed against bf16
#   invariant-tests batch-invariant mode: full-size bit identity, its product against cuBLAS, cost and parity
#   docs-tests      the README and docs snippets, GPU-only blocks included
#   bench           packvit bench --profile (all families and workloads unless arguments after --)
#   train-bench     packvit bench --suite training (forward + backward against the references)
#   embed-bench     packvit bench --suite files (the `files` workload, end to end)
#   vlm-bench       packvit bench --suite vlm (LFM2-VL's image features, transformers' tower and packvit's)
#
# FA4 needs two calls (.fa4 and .fa4b exceed one call's carry): one carrying .fa4 that starts with
# `fa4-extract` (a carried folder does not stay for the next call: its contents must leave the
# tree), then, while the machine is warm, one carrying .fa4b that starts with `fa4-install`; later
# calls find it in /opt/fa4site.
#
# Run on an H200 in this release (figures in docs/gpu-run-2026-12-04/ and its second-run/): every
# stage but cpu-tests; embed-bench on an H100 (107 s; docs/gpu-run-2026-12-07/). A call of
# `fa4-install attention-tests model-tests` takes about 420 s, `training-tests graph-tests vlm-tests`
# about 210 s, `checkpoints` 44 s. Keep fp8-tests, invariant-tests and embed-bench in calls of their
# own (minutes each).
#
# Full-size random checkpoints go to $PACKVIT_CKPT_DIR, reused by later calls on the machine. Logs
# and figures go to gpu_out/ (or $GPU_WORK; `GPU_WORK=$OUT` writes them straight to the GPU
# machine's returned folder, which keeps what a call cut short had written); with $OUT set and
# another work folder they are packed into $OUT/gpu_results.tar.gz, with the summary beside it.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
FA4_PATH=/opt/fa4site:/opt/fa4site/nvidia_cutlass_dsl/dsl_packages
[ -d /opt/fa4site/flash_attn ] && export PYTHONPATH=$FA4_PATH:src
work=${GPU_WORK:-gpu_out}; mkdir -p "$work"
export PACKVIT_CKPT_DIR=${PACKVIT_CKPT_DIR:-/tmp/packvit-ckpts} PACKVIT_GPU_REPORT="$work/gpu_figures.jsonl"
python=${PYTHON:-python3}
stages=(); bench_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; bench_args=("$@"); break; fi
  stages+=("$1"); shift
done
status=()
run() {  # run NAME COMMAND...: the command's output to $work/NAME.log, its last line to the summary
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$work/$name.log" 2>&1
  status+=("$name ($((SECONDS - start)) s, exit $?): $(grep -v '^FIGURES' "$work/$name.log" | tail -n 1)")
  tail -n 15 "$work/$name.log"
}
pytest_gpu() { $python -m pytest -q -m gpu -s -p no:cacheprovider "$@"; }

for stage in "${stages[@]}"; do
  case $stage in
    fa4-extract) mkdir -p /opt/fa4libs && tar -C /opt/fa4libs -xJf .fa4/libs_cu13.tar.xz \
        && status+=("fa4-extract: done") || status+=("fa4-extract: FAILED") ;;
    fa4-install)
      $python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /opt/fa4site .fa4b/*.whl \
        && cp -r /opt/fa4libs/. /opt/fa4site/ \
        && PYTHONPATH=$FA4_PATH $python -c "import flash_attn.cute" \
        && status+=("fa4-install: done") || status+=("fa4-install: FAILED")
      export PYTHONPATH=$FA4_PATH:src ;;
    info) run info $python -m packvit info --head_dim 64 72 80 104 128 ;;
    checkpoints) run checkpoints $python -c "import os; from pathlib import Path; from packvit.harness import FAMILIES, get_adapter; [print(get_adapter(f).cached_random_checkpoint(Path(os.environ['PACKVIT_CKPT_DIR']), size='full')) for f in FAMILIES]" ;;
    cpu-tests) run cpu-tests $python -m pytest -q -m "not gpu" -p no:cacheprovider -n 8 tests ;;
    attention-tests) run attention-tests pytest_gpu tests/test_attention_gpu.py ;;
    model-tests) run model-tests pytest_gpu tests/test_models_gpu.py tests/test_packing.py ;;
    training-tests) run training-tests pytest_gpu tests/test_training_gpu.py ;;
    graph-tests) run graph-tests pytest_gpu tests/test_cuda_graphs_gpu.py ;;
    vlm-tests) run vlm-tests pytest_gpu tests/test_vlm_transformers.py ;;
    embed-tests) run embed-tests pytest_gpu tests/test_embed_gpu.py tests/test_preprocess_device_gpu.py ;;
    fp8-tests) run fp8-tests pytest_gpu tests/test_fp8_gpu.py ;;
    invariant-tests) run invariant-tests pytest_gpu tests/test_batch_invariant_gpu.py ;;
    docs-tests) run docs-tests $python -m pytest -q -s -p no:cacheprovider tests/test_docs.py ;;
    bench) run bench $python -m packvit bench --profile --ckpt_dir "$PACKVIT_CKPT_DIR" --out "$work/bench" "${bench_args[@]}" ;;
    train-bench) run train-bench $python -m packvit bench --suite training --ckpt_dir "$PACKVIT_CKPT_DIR" --out "$work/train_bench" ;;
    embed-bench) run embed-bench $python -m packvit bench --suite files --num_files 5000 --size full --out "$work/embed_bench" ;;
    vlm-bench) run vlm-bench $python -m packvit bench --suite vlm --out "$work/vlm_bench" ;;
    *) echo "unknown stage $stage; see the header of $0"; exit 2 ;;
  esac
done

summary() {
  echo "=== summary ==="
  if [ -s "$PACKVIT_GPU_REPORT" ]; then
    $python - "$PACKVIT_GPU_REPORT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "tokens" not in r:  # the other checks' figures
        print(json.dumps(r))
        continue
    t, first, pooled = r["tokens"], r["first_token"], r["pooled"]
    pooled_text = f"pooled cos min {pooled['min_cosine']:.6f} max|d| {pooled['max_diff']:.2e}" if pooled else "no pooled"
    print(f"{r['family']:9s} {r['workload']:6s} {r['dtype']:8s} items {r['items']:4d}  tokens: max|d| {t['max_diff']:.2e} "
          f"mean|d| {t['mean_diff']:.2e} cos min/mean {t['min_cosine']:.5f}/{t['mean_cosine']:.6f}  "
          f"first-token cos min {first['min_cosine']:.6f}  {pooled_text}")
PY
  fi
  for table in "$work"/bench/bench.md "$work"/train_bench/*.md "$work"/embed_bench/*.md; do
    [ -f "$table" ] && cat "$table"
  done
  for figures in "$work"/vlm_bench/*.json; do
    [ -f "$figures" ] && cat "$figures"
  done
  printf '%s\n' "${status[@]}"
}
echo
summary | tee "$work/summary.txt"
if [ -n "${OUT:-}" ] && [ "$(realpath "$work")" != "$(realpath "$OUT")" ]; then
  cp "$work/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_results.tar.gz" -C "$work" .
fi
