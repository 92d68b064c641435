// CUDA kernels for the decoder layer's elementwise ops (schemas in ../layer_ops.cpp), one launch each
// instead of eager PyTorch's chain of small kernels:
//
//   rms_norm(x, w, eps)            = w * (x * rsqrt(mean(x^2) + eps))           per row of x [.., n]
//   add_rms_norm(x, res, w, eps)   = (rms_norm(h, w, eps), h)  with h = x + res
//   silu_mul(gate, up)             = silu(gate) * up
//   rotary(x, cos, sin)            = x * cos + rotate_half(x) * sin             x [T, H, D], cos/sin [T, D]
//
// Rounded where Hugging Face's eager code rounds, as the CPU kernels are (../layer_ops.cpp): x + res
// to x's dtype; the norm in fp32, rounded before the product with w; silu(gate) before the product
// with up; x * cos and rotate_half(x) * sin each before their sum. The norms: one block per row, the
// sum of squares reduced over warps then through shared memory. fp32, fp16 and bf16.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "compat.cuh"
#include "../layer_ops_checks.h"

namespace openlora {
namespace {

constexpr int kNormThreads = 256;
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T round_to(float v) {
  return static_cast<T>(v);
}

// grid (rows), kNormThreads threads: h = round(x + res) (or x), out = round(w * round(h * inv)).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
norm_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
            T* __restrict__ out, T* __restrict__ sum_out, int64_t n, float eps) {
  __shared__ float warp_sums[kNormThreads / 32];
  __shared__ float inv_shared;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float h = static_cast<float>(xr[i]);
    if (res != nullptr) {
      const T hr = round_to<T>(h + static_cast<float>(res[row * n + i]));
      sum_out[row * n + i] = hr;
      h = static_cast<float>(hr);
    }
    ss += h * h;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += warp_sums[i];
    inv_shared = 1.f / sqrtf(total / static_cast<float>(n) + eps);
  }
  __syncthreads();
  const float inv = inv_shared;
  const T* hr = res != nullptr ? sum_out + row * n : xr;  // this thread wrote its own elements
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T normed = round_to<T>(static_cast<float>(hr[i]) * inv);
    out[row * n + i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
  }
}

// out = round(round(silu(g)) * u), a grid-stride loop.
template <typename T>
__global__ void __launch_bounds__(kThreads)
silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out, int64_t numel) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gv = static_cast<float>(g[i]);
    const T s = round_to<T>(gv / (1.f + expf(-gv)));
    out[i] = round_to<T>(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

// One thread per (t, h, d < D/2), both halves: out[d] = round(round(x[d] c[d]) + round(-x[d+D/2] s[d])),
// out[d+D/2] = round(round(x[d+D/2] c[d+D/2]) + round(x[d] s[d+D/2])).
template <typename T>
__global__ void __launch_bounds__(kThreads)
rotary_kernel(const T* __restrict__ x, const T* __restrict__ c, const T* __restrict__ s,
              T* __restrict__ out, int64_t T_, int64_t H, int64_t half) {
  const int64_t total = T_ * H * half;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % half, th = i / half, t = th / H;
    const T* xr = x + th * 2 * half;
    const T* cr = c + t * 2 * half;
    const T* sr = s + t * 2 * half;
    const float x1 = static_cast<float>(xr[d]), x2 = static_cast<float>(xr[d + half]);
    const T lo_a = round_to<T>(x1 * static_cast<float>(cr[d]));
    const T lo_b = round_to<T>(-x2 * static_cast<float>(sr[d]));
    const T hi_a = round_to<T>(x2 * static_cast<float>(cr[d + half]));
    const T hi_b = round_to<T>(x1 * static_cast<float>(sr[d + half]));
    out[th * 2 * half + d] = round_to<T>(static_cast<float>(lo_a) + static_cast<float>(lo_b));
    out[th * 2 * half + d + half] = round_to<T>(static_cast<float>(hi_a) + static_cast<float>(hi_b));
  }
}

unsigned blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

std::tuple<at::Tensor, at::Tensor> norm_gpu(const at::Tensor& x_, const at::Tensor* residual_,
                                            const at::Tensor& weight_, double eps) {
  const gpu::DeviceGuard guard(x_.device());
  NormIO io = prepare_norm(x_, residual_, weight_, eps, /*cuda=*/true);
  const auto &x = io.x, &weight = io.weight, &residual = io.residual;
  auto &out = io.out, &sum = io.sum;
  const int64_t n = io.n, rows = io.rows;
  TORCH_CHECK(rows <= 2147483647, "x has too many rows for one launch: ", rows);
  if (rows == 0) return {out, sum};
  const auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cuda", [&] {
    OPENLORA_LAUNCH(norm_kernel<scalar_t>, static_cast<unsigned>(rows), kNormThreads, 0, stream)(
        x.data_ptr<scalar_t>(), residual_ != nullptr ? residual.data_ptr<scalar_t>() : nullptr,
        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        residual_ != nullptr ? sum.data_ptr<scalar_t>() : nullptr, n, static_cast<float>(eps));
    OPENLORA_LAUNCH_CHECK();
  });
  return {out, sum};
}

at::Tensor silu_mul_gpu(const at::Tensor& gate_, const at::Tensor& up_) {
  check_silu_args(gate_, up_, /*cuda=*/true);
  const gpu::DeviceGuard guard(gate_.device());
  const auto gate = gate_.contiguous();
  const auto up = up_.contiguous();
  auto out = at::empty_like(gate);
  const int64_t numel = gate.numel();
  if (numel == 0) return out;
  const auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "silu_mul_cuda", [&] {
    OPENLORA_LAUNCH(silu_mul_kernel<scalar_t>, blocks_for(numel), kThreads, 0, stream)(
        gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), numel);
    OPENLORA_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rotary_gpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  check_rotary_args(x_, cos_, sin_, /*cuda=*/true);
  const gpu::DeviceGuard guard(x_.device());
  const auto x = x_.contiguous();
  const auto cs = cos_.contiguous();
  const auto sn = sin_.contiguous();
  auto out = at::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1), half = x.size(2) / 2;
  if (T * H * half == 0) return out;
  const auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cuda", [&] {
    OPENLORA_LAUNCH(rotary_kernel<scalar_t>, blocks_for(T * H * half), kThreads, 0, stream)(
        x.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(), sn.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), T, H, half);
    OPENLORA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

OPENLORA_REGISTER_GPU_KERNEL("rms_norm", NormOps<norm_gpu>::rms_norm)
OPENLORA_REGISTER_GPU_KERNEL("add_rms_norm", NormOps<norm_gpu>::add_rms_norm)
OPENLORA_REGISTER_GPU_KERNEL("silu_mul", silu_mul_gpu)
OPENLORA_REGISTER_GPU_KERNEL("rotary", rotary_gpu)

}  // namespace openlora
