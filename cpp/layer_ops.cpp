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
// roundings. The pure-PyTorch references are in services/executor/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace openlora {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, at least

// Rows of `n` elements per parallel task.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, n)); }

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16 on CPU, got ", t.scalar_type());
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must be [", x.size(-1),
              "] (x's last dim), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on x's device ", x.device(), ", got ",
              weight.device());
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

// out[row] = w * round(h * rsqrt(mean(h^2) + eps)), h = row (fp32 sums).
template <typename T>
inline void norm_row(const T* h, const T* w, int64_t n, float eps, T* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(h[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const T normed = round_to<T>(static_cast<float>(h[i]) * inv);
    out[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  check_norm_args(x_, weight_, eps);
  const auto x = x_.contiguous();
  const auto weight = weight_.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * n, wp, n, static_cast<float>(eps), op + r * n);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_, const at::Tensor& residual_,
                                                    const at::Tensor& weight_, double eps) {
  check_norm_args(x_, weight_, eps);
  TORCH_CHECK(residual_.sizes() == x_.sizes(), "residual must have x's shape ", x_.sizes(), ", got ",
              residual_.sizes());
  TORCH_CHECK(residual_.scalar_type() == x_.scalar_type(), "residual must have x's dtype ",
              x_.scalar_type(), ", got ", residual_.scalar_type());
  TORCH_CHECK(residual_.device() == x_.device(), "residual must be on x's device ", x_.device(),
              ", got ", residual_.device());
  const auto x = x_.contiguous();
  const auto residual = residual_.contiguous();
  const auto weight = weight_.contiguous();
  auto out = at::empty_like(x);
  auto sum = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* hp = sum.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* h = hp + r * n;
        const scalar_t* a = xp + r * n;
        const scalar_t* b = rp + r * n;
        for (int64_t i = 0; i < n; ++i)
          h[i] = round_to<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
        norm_row(h, wp, n, static_cast<float>(eps), op + r * n);
      }
    });
  });
  return {out, sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_, const at::Tensor& up_) {
  check_rows(gate_, "gate");
  TORCH_CHECK(up_.sizes() == gate_.sizes(), "up must have gate's shape ", gate_.sizes(), ", got ",
              up_.sizes());
  TORCH_CHECK(up_.scalar_type() == gate_.scalar_type(), "up must have gate's dtype ",
              gate_.scalar_type(), ", got ", up_.scalar_type());
  TORCH_CHECK(up_.device() == gate_.device(), "up must be on gate's device ", gate_.device(), ", got ",
              up_.device());
  const auto gate = gate_.contiguous();
  const auto up = up_.contiguous();
  auto out = at::empty_like(gate);
  const int64_t numel = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_mul_cpu", [&] {
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* up_p = up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float g = static_cast<float>(gp[i]);
        const scalar_t s = round_to<scalar_t>(g / (1.f + std::exp(-g)));
        op[i] = round_to<scalar_t>(static_cast<float>(s) * static_cast<float>(up_p[i]));
      }
    });
  });
  return out;
}

at::Tensor rotary_cpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  check_rows(x_, "x");
  TORCH_CHECK(x_.dim() == 3, "x must be [T, H, D], got shape ", x_.sizes());
  const int64_t T = x_.size(0), H = x_.size(1), D = x_.size(2);
  TORCH_CHECK(D % 2 == 0, "x's head dim D must be even, got ", D);
  for (const auto& [t, name] : {std::pair{&cos_, "cos"}, std::pair{&sin_, "sin"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D, name, " must be [T, D] = [", T,
                ", ", D, "], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), name, " must have x's dtype ", x_.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x_.device(), name, " must be on x's device ", x_.device(), ", got ",
                t->device());
  }
  const auto x = x_.contiguous();
  const auto cs = cos_.contiguous();
  const auto sn = sin_.contiguous();
  auto out = at::empty_like(x);
  const int64_t half = D / 2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rotary_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cs.data_ptr<scalar_t>();
    const scalar_t* sp = sn.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* c = cp + t * D;
        const scalar_t* s = sp + t * D;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* xi = xp + (t * H + h) * D;
          scalar_t* oi = op + (t * H + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            // rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
            const float rot = d < half ? -static_cast<float>(xi[d + half]) : static_cast<float>(xi[d - half]);
            const scalar_t a = round_to<scalar_t>(static_cast<float>(xi[d]) * static_cast<float>(c[d]));
            const scalar_t b = round_to<scalar_t>(rot * static_cast<float>(s[d]));
            oi[d] = round_to<scalar_t>(static_cast<float>(a) + static_cast<float>(b));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

// The schemas are a fragment of the library TORCH_LIBRARY(openlora) declares in lora_linear.cpp.
TORCH_LIBRARY_FRAGMENT(openlora, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("rotary", &rotary_cpu);
}

}  // namespace openlora
