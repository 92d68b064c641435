// Argument checks for the decoder layer's elementwise ops (rms_norm, add_rms_norm, silu_mul, rotary),
// shared by the CPU kernels (float32, bfloat16) and the CUDA ones (float16 too). Every message names
// the argument it is about.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

namespace openlora {

inline void check_rows(const at::Tensor& t, const char* name, bool cuda) {
  const auto d = t.scalar_type();
  if (cuda) {
    TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, name,
                " must be float32, bfloat16 or float16 on CUDA, got ", d);
  } else {
    TORCH_CHECK(d == at::kFloat || d == at::kBFloat16, name, " must be float32 or bfloat16 on CPU, got ", d);
  }
}

inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, bool cuda) {
  check_rows(x, "x", cuda);
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must be [", x.size(-1),
              "] (x's last dim), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on x's device ", x.device(), ", got ",
              weight.device());
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

// `t` must match `ref` in shape, dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have ", ref_name, "'s shape ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

// gate and up alike, in a dtype the backend takes.
inline void check_silu_args(const at::Tensor& gate, const at::Tensor& up, bool cuda) {
  check_rows(gate, "gate", cuda);
  check_like(up, "up", gate, "gate");
}

// A norm's checked inputs, made contiguous, and its outputs: out (the normed rows) and sum (x +
// residual, or x itself, not copied, without a residual); rows of n elements.
struct NormIO {
  at::Tensor x, weight, residual, out, sum;
  int64_t n, rows;
};

inline NormIO prepare_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                           double eps, bool cuda) {
  check_norm_args(x, weight, eps, cuda);
  if (residual != nullptr) check_like(*residual, "residual", x, "x");
  NormIO io;
  io.x = x.contiguous();
  io.weight = weight.contiguous();
  io.residual = residual != nullptr ? residual->contiguous() : at::Tensor();
  io.out = at::empty_like(io.x);
  io.sum = residual != nullptr ? at::empty_like(io.x) : io.x;
  io.n = io.x.size(-1);
  io.rows = io.n == 0 ? 0 : io.x.numel() / io.n;
  return io;
}

// A backend's rms_norm and add_rms_norm, both from its norm(x, residual or nullptr, weight, eps),
// which returns (the normed output, x + residual or x itself).
using NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor*,
                                                       const at::Tensor&, double);
template <NormFn Norm>
struct NormOps {
  static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    return std::get<0>(Norm(x, nullptr, weight, eps));
  }
  static std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                         const at::Tensor& weight, double eps) {
    return Norm(x, &residual, weight, eps);
  }
};

// x [T, H, D] with D even; cos, sin [T, D] in x's dtype and on its device.
inline void check_rotary_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool cuda) {
  check_rows(x, "x", cuda);
  TORCH_CHECK(x.dim() == 3, "x must be [T, H, D], got shape ", x.sizes());
  const int64_t T = x.size(0), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "x's head dim D must be even, got ", D);
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D, name, " must be [T, D] = [", T,
                ", ", D, "], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
                t->device());
  }
}

}  // namespace openlora
