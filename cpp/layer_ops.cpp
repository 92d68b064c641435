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
// roundings. With AVX-512 each loop runs 16 lanes at a time (simd512.h: exp16, bf16 rounding to
// nearest even); otherwise plain loops. The pure-PyTorch references are in
// services/executor/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "layer_ops_checks.h"
#include "simd512.h"

namespace openlora {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, at least

// Rows of `n` elements per parallel task.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, n)); }

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// f(float{}) or f(at::BFloat16{}): the dtypes the check_* functions admit.
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else {
    f(at::BFloat16{});
  }
}

#if defined(__AVX512F__)
using simd::load16;
using simd::round16;
using simd::store16;
using simd::tail_mask;

// out[row] = w * round(h * rsqrt(mean(h^2) + eps)), h = row (fp32 sums).
template <typename T>
inline void norm_row(const T* h, const T* w, int64_t n, float eps, T* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(h + i, tail_mask(n - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 normed = round16<T>(_mm512_mul_ps(load16(h + i, m), vinv));
    store16(out + i, _mm512_mul_ps(load16(w + i, m), normed), m);
  }
}

// h = round(a + b) over n elements.
template <typename T>
inline void add_row(const T* a, const T* b, int64_t n, T* h) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(h + i, _mm512_add_ps(load16(a + i, m), load16(b + i, m)), m);
  }
}

// out = round(round(silu(g)) * u) over n elements.
template <typename T>
inline void silu_mul_run(const T* g, const T* u, int64_t n, T* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = load16(g + i, m);
    const __m512 s = round16<T>(_mm512_div_ps(gv, _mm512_add_ps(one, simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
    store16(out + i, _mm512_mul_ps(s, load16(u + i, m)), m);
  }
}

// One head's row: out[d] = round(round(x[d] c[d]) + round(rot[d] s[d])), rot = rotate_half(x).
template <typename T>
inline void rotary_row(const T* x, const T* c, const T* s, int64_t half, T* out) {
  for (int64_t d = 0; d < half; d += 16) {
    const __mmask16 m = tail_mask(half - d);
    const __m512 x1 = load16(x + d, m), x2 = load16(x + half + d, m);
    const __m512 lo = _mm512_add_ps(round16<T>(_mm512_mul_ps(x1, load16(c + d, m))),
                                    round16<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2),
                                                             load16(s + d, m))));
    const __m512 hi = _mm512_add_ps(round16<T>(_mm512_mul_ps(x2, load16(c + half + d, m))),
                                    round16<T>(_mm512_mul_ps(x1, load16(s + half + d, m))));
    store16(out + d, lo, m);
    store16(out + half + d, hi, m);
  }
}
#else
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

template <typename T>
inline void add_row(const T* a, const T* b, int64_t n, T* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = round_to<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

template <typename T>
inline void silu_mul_run(const T* g, const T* u, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    const T s = round_to<T>(gv / (1.f + std::exp(-gv)));
    out[i] = round_to<T>(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

template <typename T>
inline void rotary_row(const T* x, const T* c, const T* s, int64_t half, T* out) {
  for (int64_t d = 0; d < 2 * half; ++d) {
    // rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
    const float rot = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
    const T a = round_to<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
    const T b = round_to<T>(rot * static_cast<float>(s[d]));
    out[d] = round_to<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}
#endif

// (norm(h) * weight, h) per row, h = x + residual, or x itself (not copied) without a residual.
std::tuple<at::Tensor, at::Tensor> norm_cpu(const at::Tensor& x_, const at::Tensor* residual_,
                                            const at::Tensor& weight_, double eps) {
  NormIO io = prepare_norm(x_, residual_, weight_, eps, /*cuda=*/false);
  const auto &x = io.x, &weight = io.weight, &residual = io.residual;
  auto &out = io.out, &sum = io.sum;
  const int64_t n = io.n, rows = io.rows;
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual_ != nullptr ? residual.data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* hp = sum.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (rp != nullptr) add_row(xp + r * n, rp + r * n, n, hp + r * n);
        norm_row(hp + r * n, wp, n, static_cast<float>(eps), op + r * n);
      }
    });
  });
  return {out, sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_, const at::Tensor& up_) {
  check_silu_args(gate_, up_, /*cuda=*/false);
  const auto gate = gate_.contiguous();
  const auto up = up_.contiguous();
  auto out = at::empty_like(gate);
  const int64_t numel = gate.numel();
  dispatch(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* up_p = up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t i0, int64_t i1) {
      silu_mul_run(gp + i0, up_p + i0, i1 - i0, op + i0);
    });
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
  const int64_t half = D / 2;
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cs.data_ptr<scalar_t>();
    const scalar_t* sp = sn.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* c = cp + t * D;
        const scalar_t* s = sp + t * D;
        for (int64_t h = 0; h < H; ++h) rotary_row(xp + (t * H + h) * D, c, s, half, op + (t * H + h) * D);
      }
    });
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
