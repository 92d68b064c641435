// lora_paged.cu as plain C++ over emulation.h: torch.ops.openlora_emu.lora_paged_add_ runs its CUDA
// kernel on CPU tensors (tests only: services/executor/ops/build.py, build_cuda_emulation).
#define OPENLORA_CUDA_EMULATION
#include "lora_paged.cu"
