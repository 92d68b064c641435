// A CPU emulation of the CUDA thread model, just enough to run openlora's kernels in tests on
// machines without a GPU (cpp/cuda/compat.cuh includes it when OPENLORA_CUDA_EMULATION is set).
//
// A launch runs its blocks one after another; each block's threads are real std::threads, so
// __syncthreads() is a barrier over the block and __shfl_xor_sync a two-phase exchange over the warp
// (threads that have returned drop out of both, as on a GPU). __shared__ variables become statics,
// which is sharing per block because blocks do not overlap; dynamic shared memory is one buffer sized
// by the launch. Only 1-D blocks of whole warps are emulated, and only what the kernels use.
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <c10/util/Exception.h>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace openlora_emu {

struct Warp {
  std::barrier<> sync{32};
  std::array<uint64_t, 32> slots{};
};

struct Block {
  explicit Block(unsigned threads) : sync(threads), warps(threads / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* this_block = nullptr;
inline dim3 block_dim, grid_dim;
inline std::vector<std::max_align_t> dynamic_smem;

inline void syncthreads() { this_block->sync.arrive_and_wait(); }

template <typename T>
T shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Warp& w = *this_block->warps[thread_idx.x / 32];
  const unsigned lane = thread_idx.x % 32;
  std::memcpy(&w.slots[lane], &value, sizeof(T));
  w.sync.arrive_and_wait();
  T other;
  std::memcpy(&other, &w.slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  w.sync.arrive_and_wait();
  return other;
}

// OPENLORA_LAUNCH(kernel, grid, block, smem, stream)(args...)
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  Launch(void (*k)(P...), dim3 g, dim3 b, size_t s) : kernel(k), grid(g), block(b), smem(s) {}

  template <typename... A>
  void operator()(A... args) const {
    TORCH_CHECK(block.y == 1 && block.z == 1 && block.x % 32 == 0 && block.x > 0,
                "the CUDA emulation runs 1-D blocks of whole warps only, got ", block.x, "x", block.y,
                "x", block.z);
    block_dim = block;
    grid_dim = grid;
    dynamic_smem.assign((smem + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t), {});
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          Block b(block.x);
          std::vector<std::thread> threads;
          threads.reserve(block.x);
          for (unsigned t = 0; t < block.x; ++t)
            threads.emplace_back([&, t] {
              thread_idx = dim3(t);
              block_idx = dim3(x, y, z);
              this_block = &b;
              kernel(args...);
              b.warps[t / 32]->sync.arrive_and_drop();  // a returned thread leaves its warp
              b.sync.arrive_and_drop();                 // and its block
            });
          for (auto& th : threads) th.join();
        }
  }
};

}  // namespace openlora_emu

#define threadIdx (::openlora_emu::thread_idx)
#define blockIdx (::openlora_emu::block_idx)
#define blockDim (::openlora_emu::block_dim)
#define gridDim (::openlora_emu::grid_dim)
#define __syncthreads() ::openlora_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::openlora_emu::shfl_xor(value, lane_mask)

namespace openlora::gpu {
using Stream = int;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline Stream current_stream() { return 0; }
}  // namespace openlora::gpu

#define OPENLORA_LAUNCH(kernel, grid, block, smem, stream) \
  ((void)(stream), ::openlora_emu::Launch(kernel, grid, block, smem))
#define OPENLORA_LAUNCH_CHECK() ((void)0)
#define OPENLORA_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::openlora_emu::dynamic_smem.data())
#define OPENLORA_REGISTER_GPU_KERNEL(name, fn) \
  TORCH_LIBRARY_FRAGMENT(openlora_emu, m) { m.def(name, &fn); }
