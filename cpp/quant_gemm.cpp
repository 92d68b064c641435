// Weight-only int8 / int4 GEMMs for the CPU (services/executor/model/quant.py), their own extension
// (openlora_quant::*), so that a decode step reads 1 or 0.5 bytes per base weight instead of 4 or 2:
//
//   y[T, N] = bf16(x)[T, K] @ W.T (+ bias)    W[n, k] = q[n, k] * s[n]                         (int8)
//                                             W[n, k] = (q[n, k] - z[n, k / G]) * s[n, k / G]  (int4)
//
// x is rounded to bfloat16 first (a no-op for bfloat16 x): every path multiplies the same inputs by
// the same weight, accumulating in float32, whatever the CPU. Two kernels:
// - *_bf16dot (quant_gemm_avx512_bf16.cpp, on CPUs with AVX512-BF16; layout in quant_gemm.h): the
//   weights' integers dequantized into cache as exact bfloat16 and multiplied with vdpbf16ps. At 32
//   tokens a step is compute-bound, and this takes twice the products an instruction of a float32 FMA.
// - int8_linear / int4_linear (here, any CPU; q row-major): each thread dequantizes a tile of output
//   rows into a cache-resident buffer in x's dtype and multiplies x by it: float32 with the BLAS sgemm_
//   torch's CPU build exports, bfloat16 with at::mm (oneDNN). Calls of at most kSmallT tokens (decode of
//   a few sequences) instead dequantize one row at a time into L1 and take its dot products with each
//   token in float32. Built with the host CPU's vector flags (model/quant.py picks them), so the
//   dequantizing loops vectorize.
// int4 q (row-major): uint8 [N, K / 2]; in each group of G inputs, byte j holds input j in its low and
// input j + G / 2 in its high nibble (so each half dequantizes with contiguous stores).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "quant_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace openlora_quant {
namespace {

constexpr int64_t kTileBytes = 512 * 1024;   // one tile of dequantized weights: about a core's L2
constexpr int64_t kSmallT = 4;                // calls of up to this many tokens: one row at a time

inline uint16_t to_bf16(float f) {          // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

template <typename Out>
inline Out cast_out(float v);
template <>
inline float cast_out<float>(float v) { return v; }
template <>
inline uint16_t cast_out<uint16_t>(float v) { return to_bf16(v); }

// rows [n0, n0 + rows) of W into out [rows, K]
template <typename Out>
void dequant_int8(const int8_t* q, const float* s, int64_t n0, int64_t rows, int64_t K, Out* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* qr = q + (n0 + r) * K;
    const float sr = s[n0 + r];
    Out* o = out + r * K;
    for (int64_t k = 0; k < K; ++k) o[k] = cast_out<Out>(static_cast<float>(qr[k]) * sr);
  }
}

template <typename Out>
void dequant_int4(const uint8_t* q, const float* s, const float* z, int64_t group, int64_t n0,
                  int64_t rows, int64_t K, Out* out) {
  const int64_t groups = K / group;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qr = q + (n0 + r) * (K / 2);
    const float* sr = s + (n0 + r) * groups;
    const float* zr = z + (n0 + r) * groups;
    Out* o = out + r * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float sg = sr[g], zg = zr[g];
      const uint8_t* qg = qr + g * group / 2;
      Out* og = o + g * group;
      const int64_t half = group / 2;
      for (int64_t j = 0; j < half; ++j) og[j] = cast_out<Out>((static_cast<float>(qg[j] & 15) - zg) * sg);
      for (int64_t j = 0; j < half; ++j) og[half + j] = cast_out<Out>((static_cast<float>(qg[j] >> 4) - zg) * sg);
    }
  }
}

// y[:, n0:n0+rows] = x @ w_tile.T, w_tile [rows, K] float32
void tile_mm_f32(const at::Tensor& x, const float* w, int64_t n0, int64_t rows, at::Tensor& y) {
  const int T = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(y.size(1)), m = static_cast<int>(rows);
  if (sgemm_ != nullptr) {   // column-major: y.T[n, t] = sum_k w[n, k] x[t, k]
    const float one = 1.f, zero = 0.f;
    sgemm_("T", "N", &m, &T, &K, &one, w, &K, x.data_ptr<float>(), &K, &zero,
           y.data_ptr<float>() + n0, &N);
    return;
  }
  auto wt = at::from_blob(const_cast<float*>(w), {rows, K}, x.options());
  y.narrow(1, n0, rows).copy_(at::mm(x, wt.t()));
}

void tile_mm_bf16(const at::Tensor& x, const uint16_t* w, int64_t n0, int64_t rows, int64_t K, at::Tensor& y) {
  auto wt = at::from_blob(const_cast<uint16_t*>(w), {rows, K}, x.options());
  y.narrow(1, n0, rows).copy_(at::mm(x, wt.t()));
}

// y[t, n] = dot(x[t], w[n]) row by row, for few tokens: x float32 [T, K] (converted once)
template <typename Dequant>
void rowwise(const at::Tensor& x32, int64_t N, at::Tensor& y, Dequant dequant) {
  const int64_t T = x32.size(0), K = x32.size(1);
  const float* xp = x32.data_ptr<float>();
  at::Tensor y32 = y.scalar_type() == at::kFloat ? y : at::empty({T, N}, x32.options());
  float* yp = y32.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t n = begin; n < end; ++n) {
      dequant(n, 1, row.data());
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = xp + t * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += xt[k] * row[k];
        yp[t * N + n] = acc;
      }
    }
  });
  if (!y32.is_same(y)) y.copy_(y32);
}

template <typename Dequant>
at::Tensor tiled_linear(const at::Tensor& x_in, int64_t N, const c10::optional<at::Tensor>& bias,
                        Dequant dequant) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [T, d_in], got shape ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x_in.scalar_type());
  auto x = x_in.scalar_type() == at::kFloat ? x_in.to(at::kBFloat16).to(at::kFloat) : x_in.contiguous();
  const int64_t T = x.size(0), K = x.size(1);
  auto y = at::empty({T, N}, x.options());
  if (T > 0 && T <= kSmallT) {
    rowwise(x.to(at::kFloat), N, y, [&](int64_t n0, int64_t rows, float* out) { dequant(n0, rows, out); });
  } else if (T > 0) {
    const bool f32 = x.scalar_type() == at::kFloat;
    const int64_t elem = f32 ? 4 : 2;
    const int64_t tile = std::max<int64_t>(8, std::min<int64_t>(N, kTileBytes / (K * elem)));
    const int64_t tiles = (N + tile - 1) / tile;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf32(f32 ? tile * K : 0);
      std::vector<uint16_t> buf16(f32 ? 0 : tile * K);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * tile, rows = std::min(tile, N - n0);
        if (f32) {
          dequant(n0, rows, buf32.data());
          tile_mm_f32(x, buf32.data(), n0, rows, y);
        } else {
          dequant(n0, rows, buf16.data());
          tile_mm_bf16(x, buf16.data(), n0, rows, K, y);
        }
      }
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

void check_common(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t k_expected) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(),
              "x, q and scales must be CPU tensors");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous(), "q must be a contiguous 2-D tensor, got shape ", q.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scales must be contiguous float32, got ",
              s.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k_expected, "x must be [T, ", k_expected, "], got shape ",
              x.sizes());
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "q must be int8, got ", q.scalar_type());
  check_common(x, q, s, q.size(1));
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(s.numel() == N, "scales must hold ", N, " values (one per output), got ", s.numel());
  const auto* qp = q.data_ptr<int8_t>();
  const auto* sp = s.data_ptr<float>();
  return tiled_linear(x, N, bias, [&](int64_t n0, int64_t rows, auto* out) {
    dequant_int8(qp, sp, n0, rows, K, out);
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                       int64_t group) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "q must be uint8 (two inputs a byte), got ", q.scalar_type());
  check_common(x, q, s, q.size(1) * 2);
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "group must be even and divide d_in ", K,
              ", got ", group);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == N && s.size(1) == K / group, "scales must be [", N, ", ",
              K / group, "], got ", s.sizes());
  TORCH_CHECK(z.sizes() == s.sizes() && z.scalar_type() == at::kFloat && z.is_contiguous(),
              "zeros must be contiguous float32 shaped as scales, got ", z.sizes());
  const auto* qp = q.data_ptr<uint8_t>();
  const auto* sp = s.data_ptr<float>();
  const auto* zp = z.data_ptr<float>();
  return tiled_linear(x, N, c10::nullopt, [&](int64_t n0, int64_t rows, auto* out) {
    dequant_int4(qp, sp, zp, group, n0, rows, K, out);
  });
}

// x [T, K] as bfloat16 bits (rounded to nearest even when float32), contiguous
at::Tensor bf16_input(const at::Tensor& x) { return x.to(at::kBFloat16).contiguous(); }

void check_bf16dot(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t n, int64_t k) {
  TORCH_CHECK(has_avx512_bf16(), "the bf16dot kernels need a CPU with AVX512-BF16 (model/quant.py packs for "
              "int8_linear / int4_linear elsewhere)");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(),
              "x, q and scales must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [T, ", k, "], got shape ", x.sizes());
  TORCH_CHECK(n > 0 && q.dim() == 4 && q.size(0) == (n + 15) / 16 && q.size(2) == 16 && q.size(3) == 2 &&
              q.is_contiguous(), "q must be contiguous [ceil(n / 16), ..., 16, 2] for n = ", n, ", got shape ",
              q.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scales must be contiguous float32, got ",
              s.scalar_type());
}

at::Tensor run_bf16dot(const at::Tensor& x_in, const at::Tensor& xs, const PackedWeight& w) {
  const at::Tensor x = bf16_input(x_in);
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, w.n}, x_in.options());
  if (T > 0)
    avx512_bf16::linear(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                        xs.defined() ? xs.data_ptr<float>() : nullptr, T, w, y.data_ptr(),
                        y.scalar_type() == at::kBFloat16);
  return y;
}

at::Tensor int8_linear_bf16dot(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t n,
                               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "q must be int8, got ", q.scalar_type());
  const int64_t k = q.size(1) * 2;
  check_bf16dot(x, q, s, n, k);
  TORCH_CHECK(s.numel() == q.size(0) * 16, "scales must hold ", q.size(0) * 16, " values (n padded to 16), got ",
              s.numel());
  at::Tensor y = run_bf16dot(x, at::Tensor(), {8, q.data_ptr(), s.data_ptr<float>(), nullptr, n, k, k});
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

at::Tensor int4_linear_bf16dot(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& zz,
                               int64_t group, int64_t n) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "q must be uint8 (two inputs a byte), got ", q.scalar_type());
  const int64_t k = q.size(1) * 4;
  check_bf16dot(x, q, s, n, k);
  TORCH_CHECK(group > 0 && group % 4 == 0 && k % group == 0, "group must be a multiple of 4 dividing d_in ", k,
              ", got ", group);
  TORCH_CHECK(s.dim() == 3 && s.size(0) == q.size(0) && s.size(1) == k / group && s.size(2) == 16,
              "scales must be [", q.size(0), ", ", k / group, ", 16], got ", s.sizes());
  TORCH_CHECK(zz.sizes() == s.sizes() && zz.scalar_type() == at::kFloat && zz.is_contiguous(),
              "zeros must be contiguous float32 shaped as scales, got ", zz.sizes());
  // xs[t, g] = the group's sum of x as the kernel multiplies it (rounded to bfloat16)
  const at::Tensor xs = bf16_input(x).to(at::kFloat).view({x.size(0), k / group, group}).sum(-1).contiguous();
  return run_bf16dot(x, xs, {4, q.data_ptr(), s.data_ptr<float>(), zz.data_ptr<float>(), n, k, group});
}

}  // namespace

bool has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// Its own library (openlora_quant, its own .so built by model/quant.py), not the openlora ops whose
// schemas cpp/ops.cpp alone declares.
TORCH_LIBRARY(openlora_quant, lib) {
  // y = x @ (q * s[:, None]).T + bias;  x [T, K] float32 | bfloat16, q [N, K] int8, s [N] float32
  lib.def("int8_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor");
  // y = x @ W.T, W[n, k] = (q4[n, k] - z[n, k // group]) * s[n, k // group];  q [N, K / 2] uint8,
  // byte g * group / 2 + j of a row = q4[g * group + j] | q4[g * group + group / 2 + j] << 4
  lib.def("int4_linear(Tensor x, Tensor q, Tensor scales, Tensor zeros, int group) -> Tensor");
  // The same products on CPUs with AVX512-BF16, weights in the layout of quant_gemm.h (n: rows before
  // padding to 16): q [ceil(n / 16), K / 2, 16, 2] int8, s [16 ceil(n / 16)] float32
  lib.def("int8_linear_bf16dot(Tensor x, Tensor q, Tensor scales, int n, Tensor? bias) -> Tensor");
  // q [ceil(n / 16), K / 4, 16, 2] uint8, s and zz (128 + zero point) [ceil(n / 16), K / group, 16] float32
  lib.def("int4_linear_bf16dot(Tensor x, Tensor q, Tensor scales, Tensor zz, int group, int n) -> Tensor");
  // Whether this CPU runs the *_bf16dot kernels.
  lib.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
}

TORCH_LIBRARY_IMPL(openlora_quant, CPU, lib) {
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int8_linear_bf16dot", &int8_linear_bf16dot);
  lib.impl("int4_linear_bf16dot", &int4_linear_bf16dot);
}

}  // namespace openlora_quant
