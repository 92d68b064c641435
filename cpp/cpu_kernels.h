// The hot loops of the served CPU ops (lora_paged_add_, paged_attention_decode, the layer ops), written
// once in the *_tiles.h headers and compiled once per instruction set: cpp/cpu_kernels_{generic,avx2,
// avx512,avx512_bf16}.cpp each include them under their own flags (services/executor/ops/build.py:
// ISA_FLAGS) and export one CpuKernels table; cpu_isa.cpp picks the table for this CPU at run time.
// The drivers (lora_paged.cpp, paged_attention.cpp, layer_ops.cpp: checks, tensors, threads) are built
// without ISA flags and call through the table. Only raw pointers cross this boundary.
#pragma once

#include <cstdint>

namespace openlora {

// One segment of lora_paged_add_ with something to add: rows [row0, row0 + rows) of x and y, its rank,
// scaling, and its page ids (r * ca for A, then r * cb for B^T, in page_index).
struct PagedSegment {
  int64_t row0, rows, rank;
  float scaling;
  const int32_t* a_pages;
  const int32_t* b_pages;
};

// One lora_paged_add_ call as raw pointers. x [T, d_in], y [T, d_out] (updated in place) of one dtype (float32
// or bfloat16 bits), arena [NP, P] of x's dtype or bfloat16 under float32 x, contiguous; t: fp32 scratch [T, r_max].
struct PagedCall {
  const void* x;
  void* y;
  const void* arena;
  int64_t d_in, d_out, P, ca, cb, r_max;
  const PagedSegment* segs;
  int64_t n_segs;
  float* t;
  int threads;
};

// What paged_attention_decode's per-item loop needs (paged_attention_tiles.h: attend_heads).
struct CacheView {
  int64_t block, row, head;  // element strides of k_cache / v_cache dims 0..2 (dim 3 is contiguous)
};

struct AttendItem {
  const void* q;        // this item's query rows [nkv * G, D]
  const void* kc;
  const void* vc;
  CacheView ks, vs;
  const int32_t* table;  // the sequence's block table
  int64_t lo, hi, bs, kv0, nkv, G, D;
  float scale;
  void* out;             // [nkv * G, D]
  float* scratch;        // 2 * nkv * G * D + kChunk * G floats
};

struct CpuKernels {
  // lora_paged_add_ over every segment (two phases: x @ A^T into t, then t @ B^T added into y).
  void (*paged_f32)(const PagedCall&);
  void (*paged_bf16)(const PagedCall&);
  void (*paged_f32_bf16)(const PagedCall&);  // float32 x and y, bfloat16 pages (--lora-dtype bfloat16)
  // paged_attention_decode: one (sequence, kv-head group) item.
  void (*attend_f32)(const AttendItem&);
  void (*attend_bf16)(const AttendItem&);
  // rows r0..r1 of [rows, n]: h = x + res (res may be null: h = x, not written), out = norm(h) * w.
  void (*norm_f32)(const void* x, const void* res, const void* w, int64_t n, float eps, void* h, void* out,
                   int64_t r0, int64_t r1);
  void (*norm_bf16)(const void* x, const void* res, const void* w, int64_t n, float eps, void* h, void* out,
                    int64_t r0, int64_t r1);
  // out[i] = silu(gate[i]) * up[i] for i in [i0, i1).
  void (*silu_mul_f32)(const void* gate, const void* up, void* out, int64_t i0, int64_t i1);
  void (*silu_mul_bf16)(const void* gate, const void* up, void* out, int64_t i0, int64_t i1);
  // tokens t0..t1 of x [T, H, D], cos/sin [T, D].
  void (*rotary_f32)(const void* x, const void* c, const void* s, int64_t H, int64_t D, void* out, int64_t t0,
                     int64_t t1);
  void (*rotary_bf16)(const void* x, const void* c, const void* s, int64_t H, int64_t D, void* out,
                      int64_t t0, int64_t t1);
};

namespace avx512_bf16 { extern const CpuKernels kCpuKernels; }
namespace avx512 { extern const CpuKernels kCpuKernels; }
namespace avx2 { extern const CpuKernels kCpuKernels; }
namespace generic { extern const CpuKernels kCpuKernels; }

const CpuKernels& cpu_ops();  // cpu_isa.cpp: the table of the instruction set in use

constexpr int64_t kAttendChunk = 32;     // keys scored before each online-softmax update
constexpr int64_t kAttendMaxGroup = 16;  // query heads per kv head handled in one pass
constexpr int64_t kAttendMaxHeads = 64;  // query heads per work item (over its kv heads)

}  // namespace openlora
