// CUDA kernel for openlora::lora_linear (schema in ../lora_linear.cpp). SGMV-style:
//   y = at::addmm(bias, x, weight.T)                                   # [T, d_out]
//   shrink: v[t, k] = scalings[s] * x[t] @ lora_a[s, k]   for t in segment g, k < ranks[s]
//   expand: y[t, o] += v[t, :r] @ lora_b[s, o, :r]
// with s = seg_slots[g]; fp32 accumulation for fp32, fp16 and bf16.
// The index values are checked on one host copy of ranks/seg_indptr/seg_slots (a single sync).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../lora_linear_checks.h"

namespace openlora {
namespace {

constexpr int kThreads = 256;  // a multiple of 32

// grid (G, r_max, token slices): block (g, k, z) computes v[t, k] for tokens t of segment g with
// t - begin == z (mod gridDim.z).  x: [T, d_in], lora_a: [S, r_max, d_in], v: [T, r_max] fp32
template <typename scalar_t>
__global__ void shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lora_a,
                              const float* __restrict__ scalings, const int32_t* __restrict__ ranks,
                              const int32_t* __restrict__ seg_indptr,
                              const int32_t* __restrict__ seg_slots, float* __restrict__ v,
                              int64_t d_in, int64_t r_max) {
  const int g = blockIdx.x, k = blockIdx.y;
  const int s = seg_slots[g];
  if (s < 0 || k >= ranks[s]) return;  // uniform over the block
  const scalar_t* a = lora_a + (static_cast<int64_t>(s) * r_max + k) * d_in;
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t t = seg_indptr[g] + blockIdx.z; t < seg_indptr[g + 1]; t += gridDim.z) {
    const scalar_t* xt = x + t * d_in;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x)
      acc += static_cast<float>(xt[i]) * static_cast<float>(a[i]);
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
      v[t * r_max + k] = scalings[s] * sum;
    }
    __syncthreads();
  }
}

// grid (G, ceil(d_out / kThreads), token slices): thread o adds v[t, :r] @ lora_b[s, o, :r] to y[t, o].
// lora_b: [S, d_out, r_max], y: [T, d_out]
template <typename scalar_t>
__global__ void expand_kernel(const float* __restrict__ v, const scalar_t* __restrict__ lora_b,
                              const int32_t* __restrict__ ranks,
                              const int32_t* __restrict__ seg_indptr,
                              const int32_t* __restrict__ seg_slots, scalar_t* __restrict__ y,
                              int64_t d_out, int64_t r_max) {
  const int g = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int s = seg_slots[g];
  if (s < 0 || o >= d_out) return;
  const int r = ranks[s];
  const scalar_t* b = lora_b + (static_cast<int64_t>(s) * d_out + o) * r_max;
  for (int64_t t = seg_indptr[g] + blockIdx.z; t < seg_indptr[g + 1]; t += gridDim.z) {
    float acc = 0.f;
    for (int k = 0; k < r; ++k) acc += v[t * r_max + k] * static_cast<float>(b[k]);
    scalar_t& out = y[t * d_out + o];
    out = static_cast<scalar_t>(static_cast<float>(out) + acc);
  }
}

at::Tensor lora_linear_cuda(const at::Tensor& x_, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a_,
                            const at::Tensor& lora_b_, const at::Tensor& scalings_,
                            const at::Tensor& ranks_, const at::Tensor& seg_indptr_,
                            const at::Tensor& seg_slots_) {
  check_lora_linear_args(x_, weight, bias, lora_a_, lora_b_, scalings_, ranks_, seg_indptr_,
                         seg_slots_);
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto lora_a = lora_a_.contiguous();
  auto lora_b = lora_b_.contiguous();
  auto scalings = scalings_.contiguous();
  auto ranks = ranks_.contiguous();
  auto seg_indptr = seg_indptr_.contiguous();
  auto seg_slots = seg_slots_.contiguous();
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t S = lora_a.size(0), r_max = lora_a.size(1), G = seg_slots.size(0);

  // One device->host copy of the index tensors, for the value checks and the grid size.
  auto host = at::cat({ranks, seg_indptr, seg_slots}).cpu();
  auto ranks_h = host.narrow(0, 0, S), indptr_h = host.narrow(0, S, G + 1);
  check_lora_linear_values(ranks_h, indptr_h, host.narrow(0, S + G + 1, G), T, r_max);
  int64_t max_len = 0;
  const int32_t* ip = indptr_h.data_ptr<int32_t>();
  for (int64_t g = 0; g < G; ++g) max_len = std::max<int64_t>(max_len, ip[g + 1] - ip[g]);

  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, weight.t())
                                                      : at::mm(x, weight.t());  // [T, d_out]
  if (G == 0 || r_max == 0 || max_len == 0 || d_out == 0) return y;

  TORCH_CHECK(r_max <= 65535, "lora_a's r_max must be <= 65535 on CUDA, got ", r_max);
  auto v = at::zeros({T, r_max}, x.options().dtype(at::kFloat));  // [T, r_max]
  const auto slices = static_cast<unsigned>(std::min<int64_t>(max_len, 65535));
  const dim3 shrink_grid(G, r_max, slices);
  const dim3 expand_grid(G, (d_out + kThreads - 1) / kThreads, slices);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_cuda", [&] {
    shrink_kernel<scalar_t><<<shrink_grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(), scalings.data_ptr<float>(),
        ranks.data_ptr<int32_t>(), seg_indptr.data_ptr<int32_t>(), seg_slots.data_ptr<int32_t>(),
        v.data_ptr<float>(), d_in, r_max);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expand_kernel<scalar_t><<<expand_grid, kThreads, 0, stream>>>(
        v.data_ptr<float>(), lora_b.data_ptr<scalar_t>(), ranks.data_ptr<int32_t>(),
        seg_indptr.data_ptr<int32_t>(), seg_slots.data_ptr<int32_t>(), y.data_ptr<scalar_t>(),
        d_out, r_max);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CUDA, m) { m.impl("lora_linear", &lora_linear_cuda); }

}  // namespace openlora
