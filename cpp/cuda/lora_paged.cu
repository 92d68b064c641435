// CUDA lora_paged_add_: each segment's LoRA delta read through the adapter arena's page index
// (semantics in ../lora_paged.cpp). The arena may live in device memory, or in mapped pinned host
// memory that the GPU reads in place (a host-tier adapter served without a copy).
//
// grid (G, ceil(T / kTok)), kThreads threads: block (g, b) takes tokens b*kTok.. of segment g (blocks
// past the segment's end leave at once). Shrink: a warp per rank row k, lanes striding over d_in page
// by page, warp-shuffle sums -> t[i, k] * scaling in shared memory. Expand: a thread per output column,
// t[i, :] . B^T[:, j] over the rank. fp32 accumulation, y rounded once.
//
// Shapes, dtypes and devices are checked on the host (every tensor on y's device: a CPU arena is
// refused, not read through a host pointer). Values are not read on the host (no device->host copy,
// no sync); the kernel bounds them instead, so nothing is read or written out of bounds: a segment's
// rows are clipped to [0, T) (seg_indptr = [0, T + 4] touches rows 0..T-1 only), a page id outside
// [0, num_pages) reads as zeros, and a segment whose (offset, rank) runs past page_index's end, or
// whose rank is above kMaxRank (what the block's shared memory holds), adds nothing: a rank is never
// clipped to a partial update. The executor refuses those ranks before they get here: adapters above
// --max-lora-rank are refused when they load, and on CUDA --max-lora-rank above kMaxRank is refused at
// start-up (services/executor/ops: CUDA_MAX_LORA_RANK, which test_cuda_emulation.py ties to kMaxRank).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#include "compat.cuh"

namespace openlora {
namespace {

constexpr int kTok = 8;
constexpr int kThreads = 256;
constexpr int kMaxRank = 256;  // = services.executor.ops.CUDA_MAX_LORA_RANK

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// T: x's and y's element type; W: the pages' (T, or bfloat16 under float32 x: --lora-dtype bfloat16).
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
lora_paged_kernel(T* __restrict__ y, const T* __restrict__ x, const W* __restrict__ arena,
                  const int32_t* __restrict__ page_index, const int32_t* __restrict__ seg_meta,
                  const float* __restrict__ seg_scalings, const int32_t* __restrict__ seg_indptr,
                  int64_t n_tokens, int64_t LM, int64_t lm, int64_t d_in, int64_t d_out, int64_t P,
                  int64_t num_pages, int64_t E, int64_t ca, int64_t cb) {
  const int64_t g = blockIdx.x;
  // the segment's rows, clipped to [0, T = n_tokens): unchecked bounds never reach past x or y
  const int64_t lo = imax(0, seg_indptr[g]), hi = imin(n_tokens, seg_indptr[g + 1]);
  const int64_t row0 = lo + static_cast<int64_t>(blockIdx.y) * kTok;
  if (row0 >= hi) return;                                   // uniform over the block
  const int64_t m = imin(kTok, hi - row0);
  const int64_t off = seg_meta[(g * LM + lm) * 2];
  const int64_t r = seg_meta[(g * LM + lm) * 2 + 1];
  if (r <= 0 || r > kMaxRank || off < 0 || off + r * (ca + cb) > E) return;
  const float s = seg_scalings[g * LM + lm];
  OPENLORA_DYNAMIC_SMEM(float, t);                          // [kTok][kMaxRank]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t k = warp; k < r; k += warps) {               // warp-uniform loop
    float acc[kTok];
    for (int i = 0; i < kTok; ++i) acc[i] = 0.f;
    for (int64_t c = 0; c < ca; ++c) {
      const int64_t pg = page_index[off + k * ca + c];
      if (pg < 0 || pg >= num_pages) continue;              // warp-uniform: same page for all lanes
      const W* a = arena + pg * P;
      const int64_t base = c * P, len = imin(P, d_in - base);
      for (int64_t j = lane; j < len; j += 32) {
        const float av = static_cast<float>(a[j]);
        for (int i = 0; i < kTok; ++i) {
          if (i < m) acc[i] += static_cast<float>(x[(row0 + i) * d_in + base + j]) * av;
        }
      }
    }
    for (int i = 0; i < kTok; ++i) {
      float v = acc[i];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) t[i * kMaxRank + k] = v * s;
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < d_out; j += blockDim.x) {
    const int64_t c = j / P, jj = j % P;
    float acc[kTok];
    for (int i = 0; i < kTok; ++i) acc[i] = 0.f;
    for (int64_t k = 0; k < r; ++k) {
      const int64_t pg = page_index[off + r * ca + k * cb + c];
      if (pg < 0 || pg >= num_pages) continue;
      const float bv = static_cast<float>(arena[pg * P + jj]);
      for (int i = 0; i < kTok; ++i) acc[i] += t[i * kMaxRank + k] * bv;
    }
    for (int i = 0; i < kTok; ++i) {
      if (i < m) {
        T* yo = y + (row0 + i) * d_out + j;
        *yo = static_cast<T>(static_cast<float>(*yo) + acc[i]);
      }
    }
  }
}

void lora_paged_add_gpu(at::Tensor y, const at::Tensor& x, const at::Tensor& arena,
                        const at::Tensor& page_index, const at::Tensor& seg_meta,
                        const at::Tensor& seg_scalings, int64_t lm, const at::Tensor& seg_indptr) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0),
              "x must be [T, d_in] and y [T, d_out], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(y.dtype() == x.dtype(), "y must have x's dtype ", x.dtype(), ", got ", y.dtype());
  const bool bf16_pages = x.scalar_type() == at::kFloat && arena.scalar_type() == at::kBFloat16;
  TORCH_CHECK(arena.dtype() == x.dtype() || bf16_pages, "arena must have x's dtype ", x.dtype(),
              " (or bfloat16 pages under float32 x), got ", arena.dtype());
  TORCH_CHECK(arena.dim() == 2 && arena.is_contiguous(), "arena must be a contiguous [num_pages, "
              "page_elems] tensor, got ", arena.sizes());
  TORCH_CHECK(page_index.dim() == 1 && page_index.scalar_type() == at::kInt && page_index.is_contiguous(),
              "page_index must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(seg_indptr.dim() == 1 && seg_indptr.scalar_type() == at::kInt && seg_indptr.size(0) >= 1,
              "seg_indptr must be [G+1] int32");
  const int64_t G = seg_indptr.size(0) - 1;
  TORCH_CHECK(seg_meta.dim() == 3 && seg_meta.size(0) == G && seg_meta.size(2) == 2 &&
                  seg_meta.scalar_type() == at::kInt && seg_meta.is_contiguous(),
              "seg_meta must be a contiguous [G, LM, 2] int32 tensor with G = ", G);
  TORCH_CHECK(seg_scalings.dim() == 2 && seg_scalings.size(0) == G &&
                  seg_scalings.size(1) == seg_meta.size(1) &&
                  seg_scalings.scalar_type() == at::kFloat && seg_scalings.is_contiguous(),
              "seg_scalings must be a contiguous [G, LM] float32 tensor");
  TORCH_CHECK(0 <= lm && lm < seg_meta.size(1), "lm = ", lm, " is out of range [0, LM = ",
              seg_meta.size(1), ")");
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"x", &x}, {"arena", &arena}, {"page_index", &page_index}, {"seg_meta", &seg_meta},
      {"seg_scalings", &seg_scalings}, {"seg_indptr", &seg_indptr}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == y.device(), name, " must be on y's device ", y.device(), ", got ", t->device(),
                " (the CUDA kernel reads page memory on the GPU: the device page pool)");
  }
  const gpu::DeviceGuard guard(y.device());
  const int64_t T = x.size(0), P = arena.size(1);
  if (T == 0 || G == 0 || P == 0) return;
  TORCH_CHECK(G <= 2147483647 && (T + kTok - 1) / kTok <= 65535, "lora_paged_add_ on CUDA takes at most ",
              65535 * kTok, " tokens per call, got T = ", T);
  const int64_t ca = (x.size(1) + P - 1) / P, cb = (y.size(1) + P - 1) / P;
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>((T + kTok - 1) / kTok));
  const auto stream = gpu::current_stream();
  if (bf16_pages) {   // float32 activations over bfloat16 pages (--lora-dtype bfloat16)
    const auto kernel = &lora_paged_kernel<float, at::BFloat16>;   // (a macro argument takes no comma)
    OPENLORA_LAUNCH(kernel, grid, kThreads, kTok * kMaxRank * sizeof(float), stream)(
        y.data_ptr<float>(), x.data_ptr<float>(), arena.data_ptr<at::BFloat16>(),
        page_index.data_ptr<int32_t>(), seg_meta.data_ptr<int32_t>(), seg_scalings.data_ptr<float>(),
        seg_indptr.data_ptr<int32_t>(), T, seg_meta.size(1), lm, x.size(1), y.size(1), P, arena.size(0),
        page_index.size(0), ca, cb);
    OPENLORA_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_paged_add_cuda", [&] {
    const auto kernel = &lora_paged_kernel<scalar_t, scalar_t>;
    OPENLORA_LAUNCH(kernel, grid, kThreads, kTok * kMaxRank * sizeof(float), stream)(
        y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), arena.data_ptr<scalar_t>(),
        page_index.data_ptr<int32_t>(), seg_meta.data_ptr<int32_t>(), seg_scalings.data_ptr<float>(),
        seg_indptr.data_ptr<int32_t>(), T, seg_meta.size(1), lm, x.size(1), y.size(1), P, arena.size(0),
        page_index.size(0), ca, cb);
    OPENLORA_LAUNCH_CHECK();
  });
}

}  // namespace

OPENLORA_REGISTER_GPU_KERNEL("lora_paged_add_", lora_paged_add_gpu)

}  // namespace openlora
