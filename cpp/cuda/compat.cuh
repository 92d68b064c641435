// What the CUDA sources use of the CUDA runtime and c10's CUDA support, behind a few names, so the
// same sources also build as plain C++ over cpp/cuda/emulation.h (OPENLORA_CUDA_EMULATION), where
// CPU threads play the blocks, warps and threads and the tests run the kernels without a GPU.
#pragma once

#ifdef OPENLORA_CUDA_EMULATION
#include "emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace openlora::gpu {
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace openlora::gpu

// kernel<<<grid, block, smem, stream>>>(args...) is written OPENLORA_LAUNCH(kernel, grid, block, smem, stream)(args...)
#define OPENLORA_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define OPENLORA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define OPENLORA_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
// The op's CUDA kernel (the emulation registers it as openlora_emu::<name> for CPU tensors instead).
#define OPENLORA_REGISTER_GPU_KERNEL(name, fn) \
  TORCH_LIBRARY_IMPL(openlora, CUDA, m) { m.impl(name, &fn); }
#endif
