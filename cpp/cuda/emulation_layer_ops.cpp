// layer_ops.cu as plain C++ over emulation.h: torch.ops.openlora_emu.{rms_norm, add_rms_norm, silu_mul,
// rotary} run its CUDA kernels on CPU tensors (tests only: services/executor/ops/build.py,
// build_cuda_emulation).
#define OPENLORA_CUDA_EMULATION
#include "layer_ops.cu"
