// What the CPU lora_linear's driver (lora_linear.cpp), its per-ISA LoRA phases (lora_tiles.h, built
// once per instruction set) and its packed-GEMM path (lora_linear_packed.cpp) share. No ATen here:
// the per-ISA files include it under their own -m flags.
#pragma once

#include <cstddef>
#include <cstdint>

namespace openlora {

// One segment of tokens with an adapter to add: rows [begin, end) of x and y, its slot and rank.
struct Segment {
  int64_t begin, end, slot, rank;
  float scaling;
};

// One call's LoRA update, as raw pointers: x [T, d_in], lora_a [S, r_max, d_in], lora_b
// [S, d_out, r_max] (or stored transposed, [S, r_max, d_out] in memory, when b_t), y [T, d_out]
// updated in place, all of one dtype and contiguous; segs[0 : n_segs]; `threads` to run on.
struct LoraCall {
  const void* x;
  const void* lora_a;
  const void* lora_b;
  void* y;
  int64_t T, d_in, d_out, r_max;
  bool b_t;
  const Segment* segs;
  int64_t n_segs;
  int threads;
};

// One instruction set's kernels (cpp/lora_linear_<isa>.cpp).
struct IsaKernels {
  bool tiled_float;     // fp32 has register-tiled loops (else long segments go to BLAS)
  bool tiled_bfloat16;  // bf16 has them (AVX512_BF16)
  void (*segments_f32)(const LoraCall&);
  void (*segments_bf16)(const LoraCall&);
  // fp32 only: y = x @ weight.T + bias with the LoRA update, the base matmul cut into column blocks
  // interleaved with the LoRA phases (weight [d_out, d_in] contiguous, bias [d_out] or null).
  void (*interleaved)(const LoraCall&, const float* weight, const float* bias);
};

namespace avx512_bf16 { extern const IsaKernels kKernels; }
namespace avx512 { extern const IsaKernels kKernels; }
namespace avx2 { extern const IsaKernels kKernels; }
namespace generic { extern const IsaKernels kKernels; }

constexpr int64_t kInterleaveMaxTokens = 512;  // fp32 calls of at most this many tokens interleave

}  // namespace openlora

// The Fortran BLAS sgemm of torch's CPU build (MKL or OpenBLAS export it). Weak: against a torch
// without one, the extension still loads and lora_linear_cpu keeps to at::addmm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

// MKL's packed GEMM (weak too: OpenBLAS builds of torch lack it, and then every block calls sgemm_).
// The enum arguments are passed as their int values: column-major 102, the B matrix 162, no
// transpose 111, transpose 112, packed 151.
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest) __attribute__((weak));
extern "C" void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                                    const float* a, int lda, const float* b, int ldb, float beta,
                                    float* c, int ldc) __attribute__((weak));

namespace openlora {
constexpr int kColMajor = 102, kAMatrix = 161, kBMatrix = 162, kNoTrans = 111, kTrans = 112, kPacked = 151;
}  // namespace openlora
