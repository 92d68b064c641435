#!/usr/bin/env bash
# The one prepared run for a lent GPU (device tool; about 15 minutes of device time in all):
# build the extension with its CUDA sources, run every CUDA test of the kernels, then time them.
#
#   here, once:  .venv/bin/pip download structlog --no-deps -d .gpu_wheels   (the image lacks it)
#   device run:  bash benchmarks/gpu_check.sh   carry [".gpu_wheels"], timeout_s 540;
#                output in $OUT/gpu_check.log
#
# The device image's python3 has torch (CUDA), pytest, transformers, peft, safetensors, tokenizers
# and ninja; structlog (for the engine test) comes from .gpu_wheels. The build uses all cores
# (MAX_JOBS) and a build dir under /tmp.
set -uo pipefail
export PYTHONUNBUFFERED=1 OPENLORA_BUILD_DIR=/tmp/openlora-build MAX_JOBS="${MAX_JOBS:-16}"
PY="${PY:-python3}"
LOG="${OUT:-/tmp}/gpu_check.log"
{
  date; nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  "$PY" -c "import structlog" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .gpu_wheels structlog
  start=$SECONDS
  "$PY" -c "from services.executor import ops; print('kernel backend:', ops.kernel_backend())"
  echo "build: $((SECONDS - start)) s"
  "$PY" -m pytest -q -x -p no:cacheprovider -k "cuda" tests/test_kernel.py tests/test_paged_attention.py \
      tests/test_layer_ops.py tests/test_engine_oracle.py tests/test_lora_paged.py
  echo "tests done at $((SECONDS - start)) s"
  # decode T=64 G=64, prefill T=512 G=8 and one adapter's T=2048 prefill, fp32/bf16/fp16
  "$PY" benchmarks/kernel.py --device cuda --rounds 50
  "$PY" benchmarks/kernel.py --device cuda --attention --bf16 --rounds 30
  echo "all done at $((SECONDS - start)) s"
} 2>&1 | tee "$LOG"
