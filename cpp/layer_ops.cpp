// The elementwise ops of a decoder layer, each one pass over memory instead of torch's chain of
// small ops (at decode a step's tensors are tiny and each op's dispatch costs more than its math):
//
//   rms_norm(x, w, eps)            = w * (x * rsqrt(mean(x^2) + eps))           per row of x [T, n]
//   add_rms_norm(x, res, w, eps)   = (rms_norm(h, w, eps), h)  with h = x + res
//   silu_mul(gate, up)             = silu(gate) * up
//   rotary(x, cos, sin)            = x * cos + rotate_half(x) * sin             x [T, H, D], cos/sin [T, D]
//
// Each rounds where Hugging Face's eager PyTorch code rounds, so bf16 results match it: x + res is
// rounded to x's dtype; the norm is computed in fp32 and rounded to x's dtype before the (rounded)
// multiplication by w; silu(gate) is rounded before the multiplication by up; x * cos and
// rotate_half(x) * sin are each rounded before their sum. fp32 is the same arithmetic without the
// roundings. The loops (layer_ops_tiles.h) are compiled once per instruction set and picked at run
// time (cpu_isa.cpp); this file checks the arguments and splits rows over threads. The pure-PyTorch
// references are in services/executor/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu_kernels.h"
#include "layer_ops_checks.h"

namespace openlora {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, at least

// Rows of `n` elements per parallel task.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, n)); }

// (norm(h) * weight, h) per row, h = x + residual, or x itself (not copied) without a residual.
std::tuple<at::Tensor, at::Tensor> norm_cpu(const at::Tensor& x_, const at::Tensor* residual_,
                                            const at::Tensor& weight_, double eps) {
  NormIO io = prepare_norm(x_, residual_, weight_, eps, /*cuda=*/false);
  const auto &x = io.x, &weight = io.weight, &residual = io.residual;
  auto &out = io.out, &sum = io.sum;
  const int64_t n = io.n, rows = io.rows;
  const bool f32 = x.scalar_type() == at::kFloat;
  const auto norm = f32 ? cpu_ops().norm_f32 : cpu_ops().norm_bf16;
  const void* rp = residual_ != nullptr ? residual.data_ptr() : nullptr;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    norm(x.data_ptr(), rp, weight.data_ptr(), n, static_cast<float>(eps), sum.data_ptr(), out.data_ptr(), r0, r1);
  });
  return {out, sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_, const at::Tensor& up_) {
  check_silu_args(gate_, up_, /*cuda=*/false);
  const auto gate = gate_.contiguous();
  const auto up = up_.contiguous();
  auto out = at::empty_like(gate);
  const int64_t numel = gate.numel();
  const auto silu = gate.scalar_type() == at::kFloat ? cpu_ops().silu_mul_f32 : cpu_ops().silu_mul_bf16;
  at::parallel_for(0, numel, kGrainElements, [&](int64_t i0, int64_t i1) {
    silu(gate.data_ptr(), up.data_ptr(), out.data_ptr(), i0, i1);
  });
  return out;
}

at::Tensor rotary_cpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  check_rotary_args(x_, cos_, sin_, /*cuda=*/false);
  const int64_t T = x_.size(0), H = x_.size(1), D = x_.size(2);
  const auto x = x_.contiguous();
  const auto cs = cos_.contiguous();
  const auto sn = sin_.contiguous();
  auto out = at::empty_like(x);
  const auto rot = x.scalar_type() == at::kFloat ? cpu_ops().rotary_f32 : cpu_ops().rotary_bf16;
  at::parallel_for(0, T, row_grain(H * D), [&](int64_t t0, int64_t t1) {
    rot(x.data_ptr(), cs.data_ptr(), sn.data_ptr(), H, D, out.data_ptr(), t0, t1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("rms_norm", &NormOps<norm_cpu>::rms_norm);
  m.impl("add_rms_norm", &NormOps<norm_cpu>::add_rms_norm);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("rotary", &rotary_cpu);
}

}  // namespace openlora
