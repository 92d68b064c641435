// CUDA kernel for openlora::lora_linear (schema in ../lora_linear.cpp):
//   y = addmm(bias, x, weight.T)                                        # cuBLAS, [T, d_out], x's dtype
//   for each segment g with slot s = seg_slots[g] >= 0 and rank r = ranks[s] > 0, rows of g:
//     y[rows] += scalings[s] * (x[rows] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T   (fp32 accumulation)
//
// The LoRA term, BGMV-style (as Punica and S-LoRA do at decode, where reading each adapter once is
// what costs), in two launches over all segments:
//   shrink_kernel  one warp per (segment, rank row k): v[t, k] = scaling * x[t] @ lora_a[s, k] for the
//                  segment's tokens, kMaxTokens at a time, so each row of lora_a is read once per
//                  chunk, in 16-byte loads
//   expand_kernel  one thread per (segment, output row o): y[t, o] += v[t, :r] @ lora_b[s, o, :r], the
//                  chunk's v in shared memory, the row of lora_b read once per chunk
// lora_linear (checked) sends segments of more than kMaxTokens tokens (prefill) to cuBLAS instead: two
// fp32 GEMMs a segment (the segment's x and the adapter's r rows/columns widened to fp32, so the LoRA
// term is accumulated in fp32 and y rounded once, as on CPU). No kernel reads lora_a rows or lora_b
// columns at or past a slot's rank.
//
// lora_linear copies the index tensors to the host once (one sync) for the contract's value checks
// and the split into short and long segments. lora_linear_async, the executor's op on CUDA, makes no
// copy and never syncs: its indices come from the engine, and the kernels bound every index on the
// device instead (an out-of-range one is skipped, not raised). Only c10's CUDA headers are included (not ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS/cuSPARSE headers), so the file also compiles where only nvcc and torch's headers
// are installed: services/executor/ops/build.py's compile check does that on machines without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "compat.cuh"
#include "../lora_linear_checks.h"

namespace openlora {
namespace {

constexpr int kMaxTokens = 8;           // tokens of a short segment (the kernels keep one sum each)
constexpr int kBlockTokens = 64;        // tokens of a segment one block covers (grid z: a long segment
                                        // spreads over ceil(n / kBlockTokens) blocks, not one)
constexpr int kWarps = 8;               // warps per block
constexpr int kThreads = 32 * kWarps;
constexpr int64_t kMaxShortRank = 1024; // expand_kernel keeps kMaxTokens x r_max floats in shared memory

// out[j] = p[j] for j < N, widened to fp32: one 16-byte load when N * sizeof(scalar_t) == 16 (the
// caller guarantees the alignment), else N scalar loads.
template <typename scalar_t, int N>
__device__ __forceinline__ void load_f32(const scalar_t* __restrict__ p, float (&out)[N]) {
  if constexpr (N * sizeof(scalar_t) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    scalar_t e[N];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(p[j]);
  }
}

// Segment g as the kernels see it: its slot, rows [begin, begin + n) and rank, with every index
// bounded on the device (a slot outside [0, S), rows outside [0, T), a rank outside [0, r_max] leave
// nothing to do), so even unchecked index values (lora_linear_async) never lead to an out-of-bounds
// read. Segments longer than max_tokens are left to the host's GEMMs.
struct SegmentView {
  int s;
  int64_t begin, n;
  int r;
};

__device__ __forceinline__ SegmentView segment(int g, const int32_t* __restrict__ seg_indptr,
                                               const int32_t* __restrict__ seg_slots,
                                               const int32_t* __restrict__ ranks, int64_t S,
                                               int64_t T, int64_t r_max, int64_t max_tokens) {
  SegmentView sv{seg_slots[g], 0, 0, 0};
  if (sv.s < 0 || sv.s >= S) return sv;
  const int64_t lo = seg_indptr[g], hi = seg_indptr[g + 1];
  sv.begin = lo < 0 ? 0 : lo;
  const int64_t end = hi > T ? T : hi;
  const int64_t n = end - sv.begin;
  if (n <= 0 || n > max_tokens) return sv;
  const int64_t r = ranks[sv.s];
  sv.r = static_cast<int>(r < 0 ? 0 : (r > r_max ? r_max : r));
  sv.n = n;
  return sv;
}

// grid (G, ceil(r_max / kWarps), ceil(T / kBlockTokens)), kThreads threads; warp w of block (g, y, z)
// computes rank row k = y * kWarps + w of segment g for its tokens [z * kBlockTokens, (z + 1) *
// kBlockTokens), kMaxTokens at a time (each chunk re-reads the row, from cache); blocks past the
// segment's end return at once.  x [T, d_in], lora_a [S, r_max, d_in], v [T, r_max] fp32.
// VEC elements per load: 16 bytes' worth when d_in and the pointers allow, else 1.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lora_a,
              const float* __restrict__ scalings, const int32_t* __restrict__ ranks,
              const int32_t* __restrict__ seg_indptr, const int32_t* __restrict__ seg_slots,
              float* __restrict__ v, int64_t T, int64_t S, int64_t d_in, int64_t r_max,
              int64_t max_tokens) {
  const int g = blockIdx.x, lane = threadIdx.x % 32;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  const SegmentView sv = segment(g, seg_indptr, seg_slots, ranks, S, T, r_max, max_tokens);
  if (sv.n == 0 || k >= sv.r) return;  // uniform over the warp
  const scalar_t* a = lora_a + (static_cast<int64_t>(sv.s) * r_max + k) * d_in;
  const float scaling = scalings[sv.s];
  const int64_t z0 = static_cast<int64_t>(blockIdx.z) * kBlockTokens;
  const int64_t z1 = sv.n < z0 + kBlockTokens ? sv.n : z0 + kBlockTokens;
  for (int64_t t0 = z0; t0 < z1; t0 += kMaxTokens) {
    const int64_t nt = z1 - t0 < kMaxTokens ? z1 - t0 : kMaxTokens;
    const scalar_t* xs = x + (sv.begin + t0) * d_in;
    float acc[kMaxTokens] = {};
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < d_in; i += 32 * VEC) {
      float af[VEC];
      load_f32<scalar_t, VEC>(a + i, af);
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t < nt) {
          float xf[VEC];
          load_f32<scalar_t, VEC>(xs + t * d_in + i, xf);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[t] += af[j] * xf[j];
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < nt) {  // nt is uniform over the warp: every lane takes part in the shuffles
        float sum = acc[t];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) v[(sv.begin + t0 + t) * r_max + k] = scaling * sum;
      }
    }
  }
}

// grid (G, ceil(d_out / kThreads), ceil(T / kBlockTokens)), kThreads threads, kMaxTokens * r_max
// floats of shared memory; thread o of block (g, y, z) adds v[t, :r] @ lora_b[s, o, :r] to y[t, o] for
// the segment's tokens t in [z * kBlockTokens, (z + 1) * kBlockTokens), kMaxTokens at a time (each chunk's v in shared memory; the row of lora_b re-read from cache).
// v [T, r_max] fp32, lora_b [S, d_out, r_max], y [T, d_out].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
expand_kernel(const float* __restrict__ v, const scalar_t* __restrict__ lora_b,
              const int32_t* __restrict__ ranks, const int32_t* __restrict__ seg_indptr,
              const int32_t* __restrict__ seg_slots, scalar_t* __restrict__ y, int64_t T, int64_t S,
              int64_t d_out, int64_t r_max, int64_t max_tokens) {
  OPENLORA_DYNAMIC_SMEM(float, vs);  // [nt, r]
  const SegmentView sv = segment(blockIdx.x, seg_indptr, seg_slots, ranks, S, T, r_max, max_tokens);
  const int r = sv.r;
  if (sv.n == 0 || r == 0) return;  // uniform over the block
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool active = o < d_out;  // every thread still takes part in the barriers
  const scalar_t* b = lora_b + (static_cast<int64_t>(sv.s) * d_out + (active ? o : 0)) * r_max;
  const int64_t z0 = static_cast<int64_t>(blockIdx.z) * kBlockTokens;
  const int64_t z1 = sv.n < z0 + kBlockTokens ? sv.n : z0 + kBlockTokens;  // uniform over the block
  for (int64_t t0 = z0; t0 < z1; t0 += kMaxTokens) {
    const int64_t nt = z1 - t0 < kMaxTokens ? z1 - t0 : kMaxTokens;
    __syncthreads();  // the previous chunk's reads of vs are done
    for (int64_t i = threadIdx.x; i < nt * r; i += blockDim.x)
      vs[i] = v[(sv.begin + t0 + i / r) * r_max + i % r];
    __syncthreads();
    if (!active) continue;
    float acc[kMaxTokens] = {};
    int k = 0;
    for (; k + VEC <= r; k += VEC) {
      float bf[VEC];
      load_f32<scalar_t, VEC>(b + k, bf);
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t)
        if (t < nt) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[t] += bf[j] * vs[t * r + k + j];
        }
    }
    for (; k < r; ++k) {  // the rank's last columns when r is not a multiple of VEC
      const float bk = static_cast<float>(b[k]);
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t)
        if (t < nt) acc[t] += bk * vs[t * r + k];
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t)
      if (t < nt) {
        scalar_t& out = y[(sv.begin + t0 + t) * d_out + o];
        out = static_cast<scalar_t>(static_cast<float>(out) + acc[t]);
      }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The shrink and expand over the segments of at most max_tokens tokens, with 16-byte loads where the
// rows allow them.
template <typename scalar_t>
void launch_kernels(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const at::Tensor& scalings, const at::Tensor& ranks,
                    const at::Tensor& seg_indptr, const at::Tensor& seg_slots, at::Tensor& v,
                    at::Tensor& y, int64_t max_tokens, gpu::Stream stream) {
  constexpr int kVec = std::max<int>(1, 16 / sizeof(scalar_t));
  const int64_t T = x.size(0), d_in = x.size(1), d_out = y.size(1), S = lora_a.size(0);
  const int64_t r_max = lora_a.size(1), G = seg_slots.size(0);
  const auto* xp = x.data_ptr<scalar_t>();
  const auto* ap = lora_a.data_ptr<scalar_t>();
  const auto* bp = lora_b.data_ptr<scalar_t>();
  // grid z: T bounds every segment's length (the async op knows no segment's length on the host)
  const int64_t Z = std::max<int64_t>(1, (std::min(T, max_tokens) + kBlockTokens - 1) / kBlockTokens);
  const dim3 shrink_grid(G, (r_max + kWarps - 1) / kWarps, Z);
  const bool vec_a = d_in % kVec == 0 && aligned16(xp) && aligned16(ap);
  auto shrink = vec_a ? shrink_kernel<scalar_t, kVec> : shrink_kernel<scalar_t, 1>;
  OPENLORA_LAUNCH(shrink, shrink_grid, kThreads, 0, stream)(
      xp, ap, scalings.data_ptr<float>(), ranks.data_ptr<int32_t>(), seg_indptr.data_ptr<int32_t>(),
      seg_slots.data_ptr<int32_t>(), v.data_ptr<float>(), T, S, d_in, r_max, max_tokens);
  OPENLORA_LAUNCH_CHECK();
  const dim3 expand_grid(G, (d_out + kThreads - 1) / kThreads, Z);
  const size_t smem = sizeof(float) * kMaxTokens * r_max;
  const bool vec_b = r_max % kVec == 0 && aligned16(bp);
  auto expand = vec_b ? expand_kernel<scalar_t, kVec> : expand_kernel<scalar_t, 1>;
  OPENLORA_LAUNCH(expand, expand_grid, kThreads, smem, stream)(
      v.data_ptr<float>(), bp, ranks.data_ptr<int32_t>(), seg_indptr.data_ptr<int32_t>(),
      seg_slots.data_ptr<int32_t>(), y.data_ptr<scalar_t>(), T, S, d_out, r_max, max_tokens);
  OPENLORA_LAUNCH_CHECK();
}

// checked (lora_linear): one device->host copy of the index tensors (a sync) for the value checks,
// which raise naming the argument, and for the split: long segments to cuBLAS, short ones to the
// kernels. Unchecked (lora_linear_async): no copy and no sync; every segment goes to the kernels,
// which skip whatever is out of range instead of raising (see segment()).
at::Tensor lora_linear_gpu(const at::Tensor& x_, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a_,
                           const at::Tensor& lora_b_, const at::Tensor& scalings_,
                           const at::Tensor& ranks_, const at::Tensor& seg_indptr_,
                           const at::Tensor& seg_slots_, bool checked) {
  check_lora_linear_args(x_, weight, bias, lora_a_, lora_b_, scalings_, ranks_, seg_indptr_,
                         seg_slots_);
  const gpu::DeviceGuard guard(x_.device());
  auto x = x_.contiguous();
  auto lora_a = lora_a_.contiguous();
  auto lora_b = lora_b_.contiguous();
  auto scalings = scalings_.contiguous();
  auto ranks = ranks_.contiguous();
  auto seg_indptr = seg_indptr_.contiguous();
  auto seg_slots = seg_slots_.contiguous();
  const int64_t T = x.size(0), S = lora_a.size(0), r_max = lora_a.size(1), G = seg_slots.size(0);
  TORCH_CHECK(checked || r_max <= kMaxShortRank, "lora_a's r_max = ", r_max, " must be <= ",
              kMaxShortRank, " for lora_linear_async on CUDA (lora_linear takes any)");

  at::Tensor host, ranks_h, indptr_h, slots_h;
  if (checked) {
    host = at::cat({ranks, seg_indptr, seg_slots}).cpu();
    ranks_h = host.narrow(0, 0, S);
    indptr_h = host.narrow(0, S, G + 1);
    slots_h = host.narrow(0, S + G + 1, G);
    check_lora_linear_values(ranks_h, indptr_h, slots_h, T, r_max);
  }

  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, weight.t())
                                                      : at::mm(x, weight.t());  // [T, d_out]
  if (G == 0 || r_max == 0 || T == 0 || y.size(1) == 0) return y;

  int64_t max_tokens = std::numeric_limits<int64_t>::max();
  if (checked) {
    max_tokens = r_max <= kMaxShortRank ? kMaxTokens : 0;  // longer: cuBLAS
    const int32_t* rk = ranks_h.data_ptr<int32_t>();
    const int32_t* ip = indptr_h.data_ptr<int32_t>();
    const int32_t* sl = slots_h.data_ptr<int32_t>();
    bool any_short = false;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = ip[g + 1] - ip[g];
      const int s = sl[g];
      if (s < 0 || n == 0 || rk[s] == 0) continue;
      if (n <= max_tokens) {
        any_short = true;
        continue;
      }
      // A long segment: fp32 GEMMs over its rows and the adapter's first r rows / columns.
      const int64_t r = rk[s];
      auto a = lora_a.select(0, s).narrow(0, 0, r).to(at::kFloat);  // [r, d_in]
      auto b = lora_b.select(0, s).narrow(1, 0, r).to(at::kFloat);  // [d_out, r]
      auto rows = y.narrow(0, ip[g], n);
      auto vg = at::mm(x.narrow(0, ip[g], n).to(at::kFloat), a.t()).mul_(scalings.narrow(0, s, 1));
      rows.add_(at::mm(vg, b.t()));  // fp32 sum, y rounded once
    }
    if (!any_short) return y;
  }

  // Every entry of v the expand reads, the shrink writes (the same segment() bounds both).
  auto v = at::empty({T, r_max}, x.options().dtype(at::kFloat));  // [T, r_max]
  const auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_cuda", [&] {
    launch_kernels<scalar_t>(x, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots, v, y,
                             max_tokens, stream);
  });
  return y;
}

// The ops' entry points: lora_linear (checked) and lora_linear_async (unchecked).
template <bool kChecked>
at::Tensor lora_linear_entry(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, const at::Tensor& scalings,
                             const at::Tensor& ranks, const at::Tensor& seg_indptr,
                             const at::Tensor& seg_slots) {
  return lora_linear_gpu(x, weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots,
                         kChecked);
}

}  // namespace

OPENLORA_REGISTER_GPU_KERNEL("lora_linear", lora_linear_entry<true>)
OPENLORA_REGISTER_GPU_KERNEL("lora_linear_async", lora_linear_entry<false>)

}  // namespace openlora
