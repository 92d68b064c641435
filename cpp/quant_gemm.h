// The int8 / int4 base GEMMs' AVX512-BF16 kernels (quant_gemm_avx512_bf16.cpp, compiled with its own
// flags; quant_gemm.cpp calls them only on a CPU that has the instructions).
//
// Layout ("bf16dot", packed at load by services/executor/model/quant.py), rows padded to Np = 16 * ceil(N / 16):
//   int8: q [Np / 16, K / 2, 16, 2] int8      q[b, p, r, j] = w_q[16 b + r, 2 p + j]
//         s [Np] float32                       w[n, k] = w_q[n, k] * s[n]
//   int4: q [Np / 16, K / 4, 16, 2] uint8      q[b, c, r, j] = w_q[16 b + r, 4 c + j] | w_q[16 b + r, 4 c + 2 + j] << 4
//         s, zz [Np / 16, K / G, 16] float32   w[n, k] = (w_q[n, k] + 128 - zz[n, k / G]) * s[n, k / G]
// (zz = 128 + the zero point: the kernel multiplies by the exact bfloat16 value 128 + w_q, whose bits
// are 0x4300 | w_q, and takes (128 + z) * sum of the group's inputs off afterwards).
#pragma once

#include <cstdint>

namespace openlora_quant {

struct PackedWeight {
  int bits;              // 8 or 4
  const void* q;
  const float* s;
  const float* zz;       // int4 only
  int64_t n, k, group;   // group: int4's G (a multiple of 4 dividing k); k for int8
};

bool has_avx512_bf16();

namespace avx512_bf16 {

// y[T, n] = x[T, k] @ w.T, products of bfloat16 inputs (x, rounded by the caller) and the exact
// weight integers summed in float32, then scaled. x: bfloat16 bits, rows of k; xs: int4 only, the
// float32 sums of x over each group [T, k / group]; y: float32, or bfloat16 bits when y_bf16.
void linear(const uint16_t* x, const float* xs, int64_t T, const PackedWeight& w, void* y, bool y_bf16);

}  // namespace avx512_bf16
}  // namespace openlora_quant
