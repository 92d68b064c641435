// The decoder layer's elementwise ops over rows of raw pointers (what each computes and where it rounds:
// layer_ops.cpp), compiled once per instruction set (cpu_kernels_<isa>.cpp). With AVX-512 each loop runs
// 16 lanes at a time (simd512.h: exp16, bf16 rounding to nearest even); otherwise plain loops, which the
// AVX2 flags vectorise where they can.
#pragma once

#include <cmath>
#include <cstdint>

#include "simd512.h"
#include "simd_vec.h"

namespace openlora {
namespace OPENLORA_ISA {
namespace {

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
    const float v = to_float(h[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const T normed = from_float<T>(to_float(h[i]) * inv);
    out[i] = from_float<T>(to_float(w[i]) * to_float(normed));
  }
}

template <typename T>
inline void add_row(const T* a, const T* b, int64_t n, T* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

template <typename T>
inline void silu_mul_run(const T* g, const T* u, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = to_float(g[i]);
    const T s = from_float<T>(gv / (1.f + std::exp(-gv)));
    out[i] = from_float<T>(to_float(s) * to_float(u[i]));
  }
}

template <typename T>
inline void rotary_row(const T* x, const T* c, const T* s, int64_t half, T* out) {
  for (int64_t d = 0; d < 2 * half; ++d) {
    // rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
    const float rot = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
    const T a = from_float<T>(to_float(x[d]) * to_float(c[d]));
    const T b = from_float<T>(rot * to_float(s[d]));
    out[d] = from_float<T>(to_float(a) + to_float(b));
  }
}
#endif

template <typename T>
void norm_rows(const void* x_, const void* res_, const void* w_, int64_t n, float eps, void* h_, void* out_,
               int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(x_);
  const T* res = static_cast<const T*>(res_);
  const T* w = static_cast<const T*>(w_);
  T* h = static_cast<T*>(h_);
  T* out = static_cast<T*>(out_);
  for (int64_t r = r0; r < r1; ++r) {
    if (res != nullptr) {
      add_row(x + r * n, res + r * n, n, h + r * n);
      norm_row(h + r * n, w, n, eps, out + r * n);
    } else {
      norm_row(x + r * n, w, n, eps, out + r * n);
    }
  }
}

template <typename T>
void silu_mul_range(const void* g, const void* u, void* out, int64_t i0, int64_t i1) {
  silu_mul_run(static_cast<const T*>(g) + i0, static_cast<const T*>(u) + i0, i1 - i0, static_cast<T*>(out) + i0);
}

template <typename T>
void rotary_rows(const void* x_, const void* c_, const void* s_, int64_t H, int64_t D, void* out_, int64_t t0,
                 int64_t t1) {
  const T* x = static_cast<const T*>(x_);
  const T* cs = static_cast<const T*>(c_);
  const T* sn = static_cast<const T*>(s_);
  T* out = static_cast<T*>(out_);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t h = 0; h < H; ++h) rotary_row(x + (t * H + h) * D, cs + t * D, sn + t * D, D / 2, out + (t * H + h) * D);
}

}  // namespace
}  // namespace OPENLORA_ISA
}  // namespace openlora
