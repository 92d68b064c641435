#!/usr/bin/env bash
# The one prepared run for a lent GPU (device tool; under 10 minutes of device time in all): build the
# extension with its CUDA sources, run every CUDA test (the kernels, and the whole engine against
# transformers+peft with --device cuda), time the served ops, then the engine benchmarks on CUDA:
# throughput.py (32 mixed adapters vs base-only) and thrash.py (Zipf(1) over 256 adapters, 5 vs 2,000
# adapters) with --device cuda. Each stage has its own time limit, so one that hangs cannot eat the
# others' time; the log says which stage ended how.
#
#   here, once (wheels the device image lacks; one per Python version it may run):
#     for v in 3.10 3.11 3.12; do .venv/bin/pip download structlog grpcio protobuf --only-binary=:all: \
#         --platform manylinux2014_x86_64 --python-version $v -d .gpu_wheels; done
#   device run:  bash benchmarks/gpu_check.sh   carry [".gpu_wheels"], timeout_s 590;
#                output in $OUT/gpu_check.log
#
# The device image's python3 has torch (CUDA), pytest, transformers, peft, safetensors, tokenizers
# and ninja; structlog, grpcio and protobuf come from .gpu_wheels when missing. The build uses all
# cores (MAX_JOBS) and a build dir under /tmp.
set -uo pipefail
export PYTHONUNBUFFERED=1 OPENLORA_BUILD_DIR=/tmp/openlora-build MAX_JOBS="${MAX_JOBS:-16}"
PY="${PY:-python3}"
LOG="${OUT:-/tmp}/gpu_check.log"
start=$SECONDS

stage() {  # stage NAME LIMIT_S CMD...: runs CMD under a time limit and says how it ended
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) at $((SECONDS - start)) s"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)') at $((SECONDS - start)) s"
}

{
  date; nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  for mod in structlog grpc google.protobuf; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .gpu_wheels \
        "$(case $mod in grpc) echo grpcio;; google.protobuf) echo protobuf;; *) echo $mod;; esac)"
  done
  stage build 180 "$PY" -c "from services.executor import ops; print('kernel backend:', ops.kernel_backend())"
  # every CUDA test: the kernels (lora_paged_add_, attention, layer ops) and the engine on CUDA against
  # transformers+peft (greedy tokens equal, logprobs close), adapters read from the device page pool
  stage tests 170 "$PY" -m pytest -q -x -p no:cacheprovider -k "cuda" tests/test_lora_paged.py \
      tests/test_paged_attention.py tests/test_layer_ops.py tests/test_engine_oracle.py tests/test_lora_dtype.py
  # the served ops: F.linear, then lora_paged_add_ on device pages, vs F.linear alone (fp32, bf16, fp16)
  stage kernel 40 "$PY" benchmarks/kernel.py --device cuda --rounds 20
  # the engine on CUDA: 32 mixed adapters vs base-only (goal >= 0.90x), no transformers+peft run
  stage throughput 70 "$PY" benchmarks/throughput.py --device cuda --skip-hf --requests 64
  # Zipf(1) over 256 adapters vs all resident, and 5 vs 2,000 adapters (S-LoRA's byte ratio included);
  # the tier sections need a registry server and are left to the CPU runs
  stage thrash 100 "$PY" benchmarks/thrash.py --device cuda --rounds 1 --requests 96 --skip-tiers \
      --many-requests 48
  echo "all done at $((SECONDS - start)) s"
} 2>&1 | tee "$LOG"
