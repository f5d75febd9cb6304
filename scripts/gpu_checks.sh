#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (a lent machine starts bare; keep calls few).
# Needs: the operator library and the benchmark's kernels in $LEAN_TVM_LIB_DIR (default build/sm_90a:
#   python -m lean_tvm.build --arch sm_90a --out build/sm_90a
#   python -m lean_tvm.bench.libraries --arch sm_90a --out build/sm_90a [--with-tvm-peer]),
# the tvm-ffi wheel in .whl/ (see ../shared/docs/GPU_RUNTIME.md). Logs go to ${OUT:-gpu_out}/.
# Usage: bash scripts/gpu_checks.sh [tests] [fp8] [sanitize] [llama] [host] [bench] [tune] [relax] [paged]
#                                   [segment_sum] [hf] [hfbench]
# (bench wants the peers: FlashInfer in .gpu/fi (../shared/tools/flashinfer_payload.sh .gpu/fi) and
#  FA3 in .gpu/fa3 (../shared/tools/fa3_payload.sh .gpu/fa3); BENCH_ARGS default --quick;
#  relax and paged need build/relax_gpu: python scripts/build_relax_gpu.py;
#  segment_sum, the stream-K rule's third operator, needs build/segment_sum:
#  python tests/segment_sum.py build --arch sm_90a --out build/segment_sum, and the yardstick;
#  hf and hfbench need transformers 5.17+ on the machine, HF_TESTS selects tests (pytest -k), HF_BENCH_ARGS
#  part of the generate() grid, e.g. "--models llama3-8b --prompts 4096"; SNAPSHOT=FILE tars the logs after
#  every step, so that a call cut short keeps what ran)
set -u
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD LEAN_TVM_LIB_DIR=${LEAN_TVM_LIB_DIR:-build/sm_90a} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
for step in "$@"; do
  case $step in
    tests) timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gpu_paged.py 2>&1 | tee "$out/gpu_tests.txt" | tail -15 ;;
    fp8) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_fp8.py 2>&1 \
           | tee "$out/gpu_fp8_tests.txt" | tail -15 ;;
    sanitize)
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_check.py > "$out/sanitize_$tool.txt" 2>&1
        echo "compute-sanitizer $tool: exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize_$tool.txt" | tail -1)"
      done ;;
    llama) timeout 300 python3 scripts/llama_decode.py 2>&1 | tee "$out/llama_decode.txt" | tail -8 ;;
    host) for lib in ${HOST_LIBS:-$LEAN_TVM_LIB_DIR}; do  # several: an A/B, e.g. HOST_LIBS="new old new old"
            LEAN_TVM_LIB_DIR=$lib timeout 120 python3 scripts/host_overhead.py 2>&1 | tee -a "$out/host_overhead.txt" | tail -16
          done ;;
    bench) PYTHONPATH=$PWD/.gpu/fi:$PYTHONPATH LEAN_TVM_FA3=$PWD/.gpu/fa3 FLASHINFER_CUDA_ARCH_LIST=9.0a timeout 590 \
            python3 -m lean_tvm.bench ${BENCH_ARGS:---quick} --out "$out/bench" 2>&1 | tail -30 ;;
    tune) timeout 300 python3 -m lean_tvm.bench.tune measure --lib build/tune_sm_90a --out "$out/tune.json" \
            > "$out/tune_log.txt" 2>&1; echo "tune: exit $?" ;;
    segment_sum)
      LEAN_TVM_SEGMENT_SUM_DIR=build/segment_sum timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_segment_sum_gpu.py 2>&1 | tee "$out/segment_sum_tests.txt" | tail -5
      timeout 400 python3 tests/segment_sum.py bench --lib build/segment_sum --yardstick "$LEAN_TVM_LIB_DIR" 2>&1 \
        | tee "$out/segment_sum_bench.txt" | tail -20 ;;
    hf) timeout 590 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_transformers.py ${HF_TESTS:+-k "$HF_TESTS"} 2>&1 \
          | tee "$out/hf_tests.txt" | tail -15 ;;
    hfbench) timeout 590 python3 -m lean_tvm.bench.hf_generate --out "$out/hf_generate" ${HF_BENCH_ARGS:-} 2>&1 \
          | tee -a "$out/hf_generate.txt" | tail -30 ;;
    relax|paged) PYTHONPATH=$PYTHONPATH:$PWD/build/relax_gpu/site:$PWD/build/relax_gpu timeout 400 \
            python3 scripts/${step}_gpu.py 2>&1 | tee "$out/${step}_gpu.txt" | tail -30 ;;
  esac
  [ -n "${SNAPSHOT:-}" ] && tar cf "$SNAPSHOT" -C "$out" .
done
