// CUDA kernel for openlora::paged_attention_decode (schema in ../paged_attention.cpp):
//   for n, h:                                      # q [N, H, D], out [N, H, D] (q's dtype)
//     c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
//     keys t in [lo, c) live at k_cache[block_tables[n, t // bs], t % bs, h // (H / KVH)]
//     out[n, h] = softmax(scale * q[n, h] @ K[lo:c].T) @ V[lo:c]
//
// One block per (sequence, query head), kWarps warps. Warp w takes keys lo + w, lo + w + kWarps, ...:
// its lanes split D (lane i holds dims i, i + 32, ...), the score is a warp sum, and each warp keeps
// an online softmax (running max m, sum l, fp32 accumulator over its lanes' dims), so no context
// length is too long and nothing is gathered. At the end the warps' (m, l, acc) are merged through
// shared memory. fp32, fp16 and bf16 caches, fp32 accumulation; D <= 32 * kMaxPerLane.
//
// paged_attention_decode checks the values (context lengths, the blocks read) on one host copy of
// block_tables and context_lens, as the CPU kernel does; paged_attention_decode_async (the executor's
// op) makes no copy and never syncs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "compat.cuh"
#include "../paged_attention_checks.h"

namespace openlora {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // D <= 256

struct CacheStrides {
  int64_t block, token, head;  // elements
};

// grid (N, H), kWarps * 32 threads.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
paged_decode_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k_cache,
                    const scalar_t* __restrict__ v_cache, const int32_t* __restrict__ tables,
                    const int32_t* __restrict__ context_lens, scalar_t* __restrict__ out,
                    CacheStrides ks, CacheStrides vs, int64_t H, int64_t D, int64_t group,
                    int64_t bs, int64_t max_blocks, int64_t num_blocks, float scale,
                    int64_t sliding_window) {
  __shared__ float warp_m[kWarps], warp_l[kWarps];
  __shared__ float warp_acc[kWarps][32 * kMaxPerLane];
  const int64_t n = blockIdx.x, h = blockIdx.y, kvh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Bounded on the device, so unchecked values (paged_attention_decode_async) never read out of
  // bounds: the context is clipped to the table, and a key in a block outside the cache is skipped.
  const int64_t c = context_lens[n] > max_blocks * bs ? max_blocks * bs : context_lens[n];
  const int64_t lo = sliding_window > 0 && c > sliding_window ? c - sliding_window : 0;
  const scalar_t* qh = q + (n * H + h) * D;
  const int32_t* table = tables + n * max_blocks;

  float qr[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    qr[j] = i < D ? static_cast<float>(qh[i]) : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t t = lo + warp; t < c; t += kWarps) {
    const int64_t block = table[t / bs], slot = t % bs;
    if (block < 0 || block >= num_blocks) continue;  // uniform over the warp
    const scalar_t* kr = k_cache + block * ks.block + slot * ks.token + kvh * ks.head;
    const scalar_t* vr = v_cache + block * vs.block + slot * vs.token + kvh * vs.head;
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < D) dot += qr[j] * static_cast<float>(kr[i]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float s = dot * scale;            // every lane has the key's score
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);  // 0 for the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < D) acc[j] = acc[j] * correction + p * static_cast<float>(vr[i]);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_m[warp] = m;  // -inf, l = 0 for a warp that had no key
    warp_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < D) warp_acc[warp][i] = acc[j];
  }
  __syncthreads();
  if (warp != 0) return;
  float mx = warp_m[0];  // -inf only if no warp had a key (never when the values were checked)
  for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, warp_m[w]);
  float weight[kWarps], total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = warp_l[w] > 0.f ? expf(warp_m[w] - mx) : 0.f;
    total += warp_l[w] * weight[w];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;  // no key: zeros
  scalar_t* oh = out + (n * H + h) * D;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < D) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_acc[w][i] * weight[w];
      oh[i] = static_cast<scalar_t>(sum * inv);
    }
  }
}

// checked (paged_attention_decode): one device->host copy of the index tensors (a sync) for the value
// checks, which raise naming the argument. Unchecked (paged_attention_decode_async, the executor's op
// on CUDA): no copy and no sync; the kernel bounds the values instead (see above).
at::Tensor paged_attention_gpu(const at::Tensor& q_, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables_,
                               const at::Tensor& context_lens_, double scale, int64_t sliding_window,
                               bool checked) {
  TORCH_CHECK(q_.dim() == 3, "q must be 3-D [N, H, D], got shape ", q_.sizes());
  TORCH_CHECK(q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kBFloat16 ||
                  q_.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16 on CUDA, got ", q_.scalar_type());
  check_paged_attention_args(q_, k_cache, v_cache, block_tables_, context_lens_, sliding_window);
  const int64_t N = q_.size(0), H = q_.size(1), D = q_.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(D <= 32 * kMaxPerLane, "q's head dim D = ", D, " must be <= ", 32 * kMaxPerLane,
              " on CUDA");
  TORCH_CHECK(H <= 65535, "q's heads H = ", H, " must be <= 65535 on CUDA");
  const gpu::DeviceGuard guard(q_.device());
  const auto q = q_.contiguous();
  const auto block_tables = block_tables_.contiguous();
  const auto context_lens = context_lens_.contiguous();
  const int64_t max_blocks = block_tables.size(1);

  if (checked) {
    const auto host = at::cat({block_tables.flatten(), context_lens}).cpu();
    const int32_t* tables_h = host.data_ptr<int32_t>();
    check_paged_attention_values(tables_h, tables_h + N * max_blocks, N, max_blocks, bs, num_blocks,
                                 sliding_window);
  }

  auto out = at::empty({N, H, D}, q.options());
  if (N == 0 || D == 0) return out;
  const CacheStrides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheStrides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const dim3 grid(N, H);
  const auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_decode_cuda", [&] {
    OPENLORA_LAUNCH(paged_decode_kernel<scalar_t>, grid, kWarps * 32, 0, stream)(
        q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
        ks, vs, H, D, H / KVH, bs, max_blocks, num_blocks, static_cast<float>(scale),
        sliding_window);
    OPENLORA_LAUNCH_CHECK();
  });
  return out;
}

// The ops' entry points: paged_attention_decode (checked) and paged_attention_decode_async.
template <bool kChecked>
at::Tensor paged_attention_entry(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale, int64_t sliding_window) {
  return paged_attention_gpu(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                             kChecked);
}

}  // namespace

OPENLORA_REGISTER_GPU_KERNEL("paged_attention_decode", paged_attention_entry<true>)
OPENLORA_REGISTER_GPU_KERNEL("paged_attention_decode_async", paged_attention_entry<false>)

}  // namespace openlora
