#!/usr/bin/env bash
# Every GPU check of packvit, from the source tree, in stages that fit one call of a GPU machine each:
#
#   bash scripts/gpu_check.sh STAGE [STAGE ...] [-- extra packvit bench arguments]
#
#   info            versions and the attention backends usable there
#   cpu-tests       the CPU suite under that machine's torch/transformers (and its torchvision/timm tests)
#   model-tests     full-size parity, no host sync, batching independence, attention and packing GPU tests
#   training-tests  gradient parity, checkpointing, compiled training, no host sync in backward (GPU)
#   graph-tests     the CUDA-graph mode's GPU tests
#   bench           packvit bench --profile (all families and workloads unless arguments after --)
#   train-bench     python -m packvit.train_bench (forward + backward against the references)
#   embed-bench     python -m packvit.embed.bench (the `files` workload, end to end)
#   fa4-install     install FlashAttention 4: .fa4b/'s wheels first, then .fa4/'s CUDA library archive
#                   over them (see ../shared/tools/fa4-carry.sh; the other order leaves a cutlass
#                   package that pip --target skips: "No module named 'cutlass.cute'")
#
# FA4 needs two calls: one carrying .fa4 (any stages; .fa4 stays on the warm machine), then, while
# the machine is warm, one carrying .fa4b that starts with `fa4-install`; later calls find it in
# /opt/fa4site. Figures go to $OUT (or gpu_out/), full-size random checkpoints to
# $PACKVIT_CKPT_DIR, reused by later calls.
#
# Measured on an H200 (this release): model-tests 345 s on a fresh machine (writing the full-size
# checkpoints included), training-tests 86 s, bench of four families x (uniform, mixed) with
# --repeats 3 318 s; one family's two workloads about 55 s once its checkpoint exists. What has not
# run yet, in the order it is worth: the FA4 pair with `model-tests bench`, `graph-tests` and
# `bench -- --workloads online`, `train-bench`, `bench -- --workloads mixed-4k video`.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
[ -d /opt/fa4site/flash_attn ] && export PYTHONPATH=/opt/fa4site:/opt/fa4site/nvidia_cutlass_dsl/dsl_packages:src
out=${OUT:-gpu_out}; mkdir -p "$out"
export PACKVIT_CKPT_DIR=${PACKVIT_CKPT_DIR:-/tmp/packvit-ckpts} PACKVIT_GPU_REPORT="$out/gpu_figures.jsonl"
python=${PYTHON:-python3}
stages=(); bench_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; bench_args=("$@"); break; fi
  stages+=("$1"); shift
done
status=()
run() {  # run NAME COMMAND...: the command's output to $out/NAME.log, its last line to the summary
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  status+=("$name ($((SECONDS - start)) s): $(grep -v '^FIGURES' "$out/$name.log" | tail -n 1)")
  tail -n 15 "$out/$name.log"
}
pytest_gpu() { $python -m pytest -q -m gpu -s -p no:cacheprovider "$@"; }

for stage in "${stages[@]}"; do
  case $stage in
    info) run info $python -m packvit info ;;
    cpu-tests) run cpu-tests $python -m pytest -q -m "not gpu" -p no:cacheprovider tests ;;
    model-tests) run model-tests pytest_gpu tests/test_models_gpu.py tests/test_attention_gpu.py tests/test_packing.py ;;
    training-tests) run training-tests pytest_gpu tests/test_training_gpu.py ;;
    graph-tests) run graph-tests pytest_gpu tests/test_cuda_graphs_gpu.py ;;
    bench) run bench $python -m packvit bench --profile --ckpt_dir "$PACKVIT_CKPT_DIR" --out "$out/bench" "${bench_args[@]}" ;;
    train-bench) run train-bench $python -m packvit.train_bench --ckpt_dir "$PACKVIT_CKPT_DIR" --out "$out/train_bench" ;;
    embed-bench) run embed-bench $python -m packvit.embed.bench --num_files 5000 --size full --out "$out/embed_bench" ;;
    fa4-install)
      $python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /opt/fa4site .fa4b/*.whl \
        && tar -C /opt/fa4site -xJf .fa4/libs_cu13.tar.xz \
        && PYTHONPATH=/opt/fa4site:/opt/fa4site/nvidia_cutlass_dsl/dsl_packages $python -c "import flash_attn.cute" \
        && status+=("fa4-install: done") || status+=("fa4-install: FAILED")
      export PYTHONPATH=/opt/fa4site:/opt/fa4site/nvidia_cutlass_dsl/dsl_packages:src ;;
    *) echo "unknown stage $stage; see the header of $0"; exit 2 ;;
  esac
done

echo
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
[ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
[ -f "$out/train_bench/train_bench.md" ] && cat "$out/train_bench/train_bench.md"
[ -f "$out/embed_bench/bench_files.md" ] && cat "$out/embed_bench/bench_files.md"
[ -f "$out/cuda_graphs.jsonl" ] && cat "$out/cuda_graphs.jsonl"
printf '%s\n' "${status[@]}"
