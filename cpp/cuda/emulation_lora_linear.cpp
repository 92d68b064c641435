// lora_linear.cu as plain C++ over emulation.h: torch.ops.openlora_emu.lora_linear runs its CUDA kernels on CPU
// tensors, CPU threads playing the GPU's (tests only: services/executor/ops/build.py, build_cuda_emulation).
#define OPENLORA_CUDA_EMULATION
#include "lora_linear.cu"
