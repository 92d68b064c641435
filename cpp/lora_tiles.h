// The LoRA phases of the CPU lora_linear (shrink, expand, and the interleaved few-token fp32 path),
// written once and compiled once per instruction set: cpp/lora_linear_{avx512_bf16,avx512,avx2,generic}.cpp
// each define OPENLORA_ISA (a namespace name) and OPENLORA_ISA_TABLE (the IsaKernels they export)
// and include this file under their own flags (services/executor/ops/build.py: ISA_SOURCES), so the
// #if defined(__AVX512F__) / __AVX2__ sections below select each file's register tiles. The driver
// (lora_linear.cpp) picks one table at run time (cpu_isa.cpp), so one binary serves every CPU.
// Only raw pointers and c10::BFloat16 cross this boundary: no ATen in a file built with ISA flags,
// whose inline functions another translation unit might otherwise pick up at link time.
// What the kernel computes and how the work is split: see lora_linear.cpp.
#pragma once

#ifndef OPENLORA_ISA
#error "define OPENLORA_ISA (the namespace) and OPENLORA_ISA_TABLE before including lora_tiles.h"
#endif

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lora_linear_cpu.h"
#include "simd512.h"

namespace openlora {
namespace OPENLORA_ISA {
namespace {

constexpr int64_t kGroup = 4;           // tokens per shrink work item
constexpr int64_t kLongSegment = 8;     // tokens from which a segment is "long"
constexpr int kPartsPerThread = 4;      // runs of work per thread and phase, claimed dynamically

// sum_i a[i] * b[i], accumulated in fp32.
template <typename scalar_t>
inline float dot(const scalar_t* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(a[i]) * b[i];
  return sum;
}

// v[t, k] = scaling * x[t] @ a[k]  for t < nt, k < r.  x: [nt, d_in], a: [r_max, d_in], v: [nt, r_max]
template <typename scalar_t>
void shrink_group(const scalar_t* x, int64_t nt, const scalar_t* a, int64_t d_in, int64_t r,
                  int64_t r_max, float scaling, float* v, const scalar_t* /*next_a*/ = nullptr,
                  int64_t /*next_rows*/ = 0) {
  std::vector<float> xf(d_in);
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t i = 0; i < d_in; ++i) xf[i] = static_cast<float>(x[t * d_in + i]);
    for (int64_t k = 0; k < r; ++k) v[t * r_max + k] = scaling * dot(a + k * d_in, xf.data(), d_in);
  }
}

// y[t, o] += v[t, :r] @ b[o, :r]  for t < nt, o in [o0, o1).  b: [d_out, r_max], v: [nt, r_max]
template <typename scalar_t>
void expand_segment(const scalar_t* b, int64_t r_max, int64_t r, const float* v, int64_t nt,
                    scalar_t* y, int64_t d_out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t t = 0; t < nt; ++t) {
      scalar_t& out = y[t * d_out + o];
      out = static_cast<float>(out) + dot(b + o * r_max, v + t * r_max, r);
    }
}

constexpr int64_t kPrefetchA = 256;  // floats ahead in a row of lora_a (register-tiled paths)
constexpr int64_t kPrefetchB = 32;   // rows ahead in lora_b (register-tiled paths)

// The rows of lora_a the next shrink tile reads, prefetched into L2 a few lines per step of the
// current tile: at decode each tile reads a fresh stretch of some adapter, and without this its
// first loads all wait on memory at once. In-process A/B on the 2-core AVX-512 Xeon, fp32: decode
// (kernel.py, d = 2048, 64 adapters) LoRA time on top of the packed base 0.71 -> 0.39 and
// 0.43 -> 0.33 ms; engine mixed-adapter run 3% faster; bf16 engine unchanged.
struct Lookahead {
  const char* p = nullptr;  // the next tile's rows (contiguous)
  int64_t lines = 0;        // their 64-byte lines
  int64_t per_step = 0;     // lines prefetched per step of the current tile

  Lookahead() = default;
  Lookahead(const void* next, int64_t bytes, int64_t steps)
      : p(static_cast<const char*>(next)), lines((bytes + 63) / 64),
        per_step(steps > 0 ? (lines + steps - 1) / steps : lines) {}

  inline void step(int64_t j) const {
#if defined(__AVX512F__) || defined(__AVX2__)
    for (int64_t l = j * per_step, e = std::min(lines, l + per_step); l < e; ++l)
      _mm_prefetch(p + 64 * l, _MM_HINT_T1);
#endif
  }
};

// The register-tiled shrink, whatever the ISA: Tiles::tile<NT, NK>(xs, as, d_in, out, la) writes
// out[t * NK + k] = xs[t] @ as[k] for NT tokens x NK rows (NT * NK == Tiles::kLanes), prefetching
// la (the next tile's rows: this slot's next NK, or next_rows of next_a after the last tile) as it
// goes. Row pointers past nt or r repeat the last valid one, so a tile never reads a row past the rank.
template <typename Tiles, int NT, int NK, typename T>
void shrink_tiles(const T* x, int64_t nt, const T* a, int64_t d_in, int64_t r, int64_t r_max,
                  float scaling, float* v, const T* next_a, int64_t next_rows) {
  static_assert(NT * NK == Tiles::kLanes, "one output lane per (token, row)");
  const T* xs[NT];
  const T* as[NK];
  alignas(64) float out[NT * NK];
  for (int t = 0; t < NT; ++t) xs[t] = x + std::min<int64_t>(t, nt - 1) * d_in;
  for (int64_t k0 = 0; k0 < r; k0 += NK) {
    for (int k = 0; k < NK; ++k) as[k] = a + std::min<int64_t>(k0 + k, r - 1) * d_in;
    const bool last = k0 + NK >= r;
    const T* ahead = last ? next_a : a + (k0 + NK) * d_in;
    const int64_t rows = last ? std::min<int64_t>(next_rows, NK) : std::min<int64_t>(NK, r - k0 - NK);
    const Lookahead la(ahead, ahead == nullptr ? 0 : rows * d_in * static_cast<int64_t>(sizeof(T)),
                       (d_in + Tiles::kStep - 1) / Tiles::kStep);
    Tiles::template tile<NT, NK>(xs, as, d_in, out, la);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t k = 0; k < NK && k0 + k < r; ++k) v[t * r_max + k0 + k] = scaling * out[t * NK + k];
  }
}

// Token groups of 1, 2 or 4 (<= kGroup) as 1 x L, 2 x L/2 or 4 x L/4 tiles.
template <typename Tiles, typename T>
void shrink_by_tiles(const T* x, int64_t nt, const T* a, int64_t d_in, int64_t r, int64_t r_max,
                     float scaling, float* v, const T* next_a, int64_t next_rows) {
  constexpr int L = Tiles::kLanes;
  if (nt == 1) return shrink_tiles<Tiles, 1, L>(x, nt, a, d_in, r, r_max, scaling, v, next_a, next_rows);
  if (nt == 2) return shrink_tiles<Tiles, 2, L / 2>(x, nt, a, d_in, r, r_max, scaling, v, next_a, next_rows);
  return shrink_tiles<Tiles, 4, L / 4>(x, nt, a, d_in, r, r_max, scaling, v, next_a, next_rows);
}

// The register-tiled expand, whatever the ISA: Tile::template run<N, M>(bt, ld, r, v, r_max, y, d_out)
// adds N tokens x M vectors of columns of bt (rows k < r, ld apart) to y. Tokens go Tile::kTokens at
// a time, then one smaller tile takes the rest; M (1..4 vectors) is the width of the block, known at
// run time. bt is lora_b transposed: a block gathered from lora_b, or lora_b itself when the caller
// stores it transposed (see expand_segment_t).
template <typename Tile, int M, int N, typename B, typename Y>
inline void expand_rest(int64_t rest, const B* bt, int64_t ld, int64_t r, const float* v, int64_t r_max,
                        Y* y, int64_t d_out) {
  if constexpr (N >= 1) {
    if (rest == N) return Tile::template run<N, M>(bt, ld, r, v, r_max, y, d_out);
    expand_rest<Tile, M, N - 1>(rest, bt, ld, r, v, r_max, y, d_out);
  }
}

template <typename Tile, int M, typename B, typename Y>
inline void expand_tokens(const B* bt, int64_t ld, int64_t r, const float* v, int64_t r_max, int64_t nt,
                          Y* y, int64_t d_out) {
  constexpr int N = Tile::kTokens;
  int64_t t = 0;
  for (; t + N <= nt; t += N)
    Tile::template run<N, M>(bt, ld, r, v + t * r_max, r_max, y + t * d_out, d_out);
  expand_rest<Tile, M, N - 1>(nt - t, bt, ld, r, v + t * r_max, r_max, y + t * d_out, d_out);
}

template <typename Tile, typename B, typename Y>
inline void expand_by_tiles(int vectors, const B* bt, int64_t ld, int64_t r, const float* v,
                            int64_t r_max, int64_t nt, Y* y, int64_t d_out) {
  switch (vectors) {
    case 4: return expand_tokens<Tile, 4>(bt, ld, r, v, r_max, nt, y, d_out);
    case 3: return expand_tokens<Tile, 3>(bt, ld, r, v, r_max, nt, y, d_out);
    case 2: return expand_tokens<Tile, 2>(bt, ld, r, v, r_max, nt, y, d_out);
    case 1: return expand_tokens<Tile, 1>(bt, ld, r, v, r_max, nt, y, d_out);
    default: return;
  }
}

// expand_segment for lora_b stored transposed: bt is this slot's [r_max, d_out] (row k = column k of
// lora_b[slot]), so the columns of y are rows of bt and no gather or lane sums are needed. The
// generic version; the ISA sections specialise it.
template <typename scalar_t>
void expand_cols_scalar(const scalar_t* bt, int64_t r, const float* v, int64_t r_max, int64_t nt,
                        scalar_t* y, int64_t d_out, int64_t o0, int64_t o1) {
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t o = o0; o < o1; ++o) {
      float sum = 0.f;
      for (int64_t k = 0; k < r; ++k) sum += v[t * r_max + k] * static_cast<float>(bt[k * d_out + o]);
      y[t * d_out + o] = static_cast<scalar_t>(static_cast<float>(y[t * d_out + o]) + sum);
    }
}

// What an expand reads after this segment's columns: the next segment's lora_b^T (rows < r) from
// column o0, so the blocks at the end of this range prefetch the start of the next one. In-process
// A/B, kernel.py decode (fp32, lora_b transposed, packed base): LoRA time on top of the base
// 0.83 -> 0.51, 0.38 -> 0.28, 0.62 -> 0.28 ms; the engine's runs did not move beyond the noise.
template <typename scalar_t>
struct NextB {
  const scalar_t* bt = nullptr;
  int64_t r = 0, o0 = 0;
};

template <typename scalar_t>
void expand_segment_t(const scalar_t* bt, int64_t r, const float* v, int64_t r_max, int64_t nt,
                      scalar_t* y, int64_t d_out, int64_t o0, int64_t o1, NextB<scalar_t> /*next*/ = {}) {
  expand_cols_scalar(bt, r, v, r_max, nt, y, d_out, o0, o1);
}

// Prefetches rows k < r of bt ([r_max, d_out]) at column o < d_out (one line each).
template <typename scalar_t>
inline void prefetch_bt(const scalar_t* bt, int64_t d_out, int64_t r, int64_t o) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if (o < d_out)
    for (int64_t k = 0; k < r; ++k) _mm_prefetch(reinterpret_cast<const char*>(bt + k * d_out + o), _MM_HINT_T0);
#endif
}

// Runs a block of bt that is already fp32 straight through Tile's register tiles (a Tile may instead
// define its own convert_and_run, as the bf16 one does).
template <typename Tile>
struct RunDirect {
  template <typename Y>
  static void convert_and_run(int vectors, const float* bt, int64_t ld, int64_t r, const float* v,
                              int64_t r_max, int64_t nt, Y* y, int64_t d_out) {
    expand_by_tiles<Tile>(vectors, bt, ld, r, v, r_max, nt, y, d_out);
  }
};

// The tiled expand_segment_t: blocks of W columns (Tile's vectors of L lanes), the leftover columns
// (d_out % L) one by one. Blocks ahead are prefetched: bt is r streams read side by side; past o1 the
// prefetch moves on to the next segment's first columns.
template <typename Tile, int W, int L, typename scalar_t>
void expand_t_by_tiles(const scalar_t* bt, int64_t r, const float* v, int64_t r_max, int64_t nt,
                       scalar_t* y, int64_t d_out, int64_t o0, int64_t o1, NextB<scalar_t> next) {
  for (int64_t ob = o0; ob < o1; ob += W) {
    const int64_t width = std::min<int64_t>(W, o1 - ob);
    const int vectors = static_cast<int>(width / L);
    for (int64_t o = ob + 2 * W; o < ob + 3 * W; o += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
      if (o < o1)
        prefetch_bt(bt, d_out, r, o);
      else if (next.bt != nullptr)
        prefetch_bt(next.bt, d_out, next.r, next.o0 + (o - o1));
    }
    Tile::convert_and_run(vectors, bt + ob, d_out, r, v, r_max, nt, y + ob, d_out);
    if (vectors * L < width)
      expand_cols_scalar(bt, r, v, r_max, nt, y, d_out, ob + vectors * L, ob + width);
  }
}

#if defined(__AVX512F__)

using simd::sum_lanes16;
using simd::tail_mask;

// out[t * NK + k] = x[t] @ a[k] over d_in, for NT tokens x NK rows (NT * NK == 16 accumulators).
template <int NT, int NK>
inline __m512 dot_tile(const float* const* x, const float* const* a, int64_t d_in, const Lookahead& la) {
  static_assert(NT * NK == 16, "one accumulator per output lane");
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d_in; i += 16) {
    la.step(i / 16);
    const __mmask16 m = tail_mask(d_in - i);
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x[t] + i);
    for (int k = 0; k < NK; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(a[k] + i + kPrefetchA), _MM_HINT_T0);
      const __m512 av = _mm512_maskz_loadu_ps(m, a[k] + i);
      for (int t = 0; t < NT; ++t) acc[t * NK + k] = _mm512_fmadd_ps(xv[t], av, acc[t * NK + k]);
    }
  }
  return sum_lanes16(acc);
}

struct TilesF32x16 {
  static constexpr int kLanes = 16, kStep = 16;  // kStep: elements of a row per step
  template <int NT, int NK>
  static void tile(const float* const* x, const float* const* a, int64_t d_in, float* out,
                   const Lookahead& la) {
    _mm512_store_ps(out, dot_tile<NT, NK>(x, a, d_in, la));
  }
};

template <>
void shrink_group<float>(const float* x, int64_t nt, const float* a, int64_t d_in, int64_t r,
                         int64_t r_max, float scaling, float* v, const float* next_a, int64_t next_rows) {
  shrink_by_tiles<TilesF32x16>(x, nt, a, d_in, r, r_max, scaling, v, next_a, next_rows);
}

// Few tokens: 16 rows of b at a time, each row's dot with v[t] for every token, reduced with
// sum_lanes16. Rows o0.. are walked in order with b prefetched kPrefetchB rows ahead, so a
// segment's b streams from memory instead of being fetched one latency at a time.
void expand_rows(const float* b, int64_t r_max, int64_t r, const float* v, int64_t nt, float* y,
                 int64_t d_out, int64_t o0, int64_t o1) {
  int64_t o = o0;
  const int64_t pf_end = d_out;  // prefetch stays inside this slot's b
  for (; o + 16 <= o1; o += 16) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t p = o + kPrefetchB + j;
      if (p < pf_end) {
        const char* row = reinterpret_cast<const char*>(b + p * r_max);
        for (int64_t k = 0; k < r; k += 16) _mm_prefetch(row + 4 * k, _MM_HINT_T0);
        _mm_prefetch(row + 4 * (r - 1), _MM_HINT_T0);
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      const float* vt = v + t * r_max;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < r; k += 16) {
        const __mmask16 m = tail_mask(r - k);  // never reads b past the rank
        const __m512 vv = _mm512_maskz_loadu_ps(m, vt + k);
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + (o + j) * r_max + k), vv, acc[j]);
      }
      float* yt = y + t * d_out + o;
      _mm512_storeu_ps(yt, _mm512_add_ps(_mm512_loadu_ps(yt), sum_lanes16(acc)));
    }
  }
  for (; o < o1; ++o)
    for (int64_t t = 0; t < nt; ++t) y[t * d_out + o] += dot(b + o * r_max, v + t * r_max, r);
}

// y[0..16) += add: fp32, or bf16 (as uint16_t) rounded once to nearest even.
inline void add_store16(float* y, __m512 add) { _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), add)); }
inline void add_store16(uint16_t* y, __m512 add) {
  const __m512 sum = _mm512_add_ps(simd::load16(reinterpret_cast<const c10::BFloat16*>(y), 0xFFFF), add);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), simd::to_bf16(sum));
}

// Expand tiles of up to 4 tokens x 4 vectors of 16 columns, bt fp32, y fp32 or bf16 (uint16_t):
//   run<N, M>: y[t, 16m .. 16m+16] += sum_k v[t, k] * bt[k, 16m ..]  for t < N, m < M, k < r.
template <typename Y>
struct ExpandX16 {
  static constexpr int kTokens = 4, kLanes = 16, kWidth = 64;
  template <int N, int M>
  static void run(const float* bt, int64_t ld, int64_t r, const float* v, int64_t r_max, Y* y,
                  int64_t d_out) {
    __m512 acc[N][M];
    for (int t = 0; t < N; ++t)
      for (int m = 0; m < M; ++m) acc[t][m] = _mm512_setzero_ps();
    int64_t k = 0;  // r >= 1; as a for loop, GCC stored acc to memory on every step
    do {
      __m512 bk[M];
      for (int m = 0; m < M; ++m) bk[m] = _mm512_loadu_ps(bt + k * ld + 16 * m);
      for (int t = 0; t < N; ++t) {
        const __m512 vk = _mm512_set1_ps(v[t * r_max + k]);
        for (int m = 0; m < M; ++m) acc[t][m] = _mm512_fmadd_ps(vk, bk[m], acc[t][m]);
      }
    } while (++k < r);
    for (int t = 0; t < N; ++t)
      for (int m = 0; m < M; ++m) add_store16(y + t * d_out + 16 * m, acc[t][m]);
  }
};
using ExpandF32x16 = ExpandX16<float>;
using ExpandF32 = ExpandF32x16;

// Many tokens: per 64 rows of b, gather them once into bt [r, 64] (b transposed), then 4 tokens at a
// time y[t, o:o+64] += sum_k v[t, k] * bt[k] (no horizontal sums).
template <>
void expand_segment<float>(const float* b, int64_t r_max, int64_t r, const float* v, int64_t nt,
                           float* y, int64_t d_out, int64_t o0, int64_t o1) {
  if (nt < kLongSegment) return expand_rows(b, r_max, r, v, nt, y, d_out, o0, o1);
  alignas(64) static thread_local float bt_small[64 * 64];
  thread_local std::vector<float> bt_big;
  float* bt = bt_small;
  if (r > 64) {
    if ((int64_t)bt_big.size() < 64 * r + 16) bt_big.resize(64 * r + 16);
    bt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bt_big.data()) + 63) & ~uintptr_t(63));
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(r_max)));
  for (int64_t ob = o0; ob < o1; ob += 64) {
    const int tiles = static_cast<int>(std::min<int64_t>(64, o1 - ob) / 16);
    for (int m = 0; m < tiles; ++m) {
      const float* bm = b + (ob + 16 * m) * r_max;
      for (int64_t k = 0; k < r; ++k)  // column k < r of 16 rows
        _mm512_store_ps(bt + k * 64 + 16 * m, _mm512_i32gather_ps(idx, bm + k, 4));
    }
    expand_by_tiles<ExpandF32x16>(tiles, bt, 64, r, v, r_max, nt, y + ob, d_out);
    for (int64_t o = ob + tiles * 16; o < std::min(ob + 64, o1); ++o)  // d_out % 16 leftovers
      for (int64_t t = 0; t < nt; ++t) y[t * d_out + o] += dot(b + o * r_max, v + t * r_max, r);
  }
}
constexpr bool kTiledFloat = true;
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA (8 lanes, 16 registers): the AVX-512 structure at half the width. Tails use
// _mm256_maskload_ps, which never touches masked-out elements, so nothing past a rank is read.

inline __m256i tail_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lane j of the result = the sum of acc[j]'s 8 lanes.
inline __m256 sum_lanes8(const __m256* acc) {
  const __m256 s0 = _mm256_hadd_ps(acc[0], acc[1]), s1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 s2 = _mm256_hadd_ps(acc[4], acc[5]), s3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 t0 = _mm256_hadd_ps(s0, s1), t1 = _mm256_hadd_ps(s2, s3);  // per 128-bit half
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// out[t * NK + k] = x[t] @ a[k] over d_in, for NT tokens x NK rows (NT * NK == 8 accumulators).
template <int NT, int NK>
inline __m256 dot_tile8(const float* const* x, const float* const* a, int64_t d_in, const Lookahead& la) {
  static_assert(NT * NK == 8, "one accumulator per output lane");
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d_in; i += 16) {  // one cache line of each row per step, prefetched once
    la.step(i / 16);
    for (int k = 0; k < NK; ++k)
      _mm_prefetch(reinterpret_cast<const char*>(a[k] + i + kPrefetchA), _MM_HINT_T0);
    for (int64_t h = i; h < i + 16; h += 8) {
      __m256 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x[t] + h);
      for (int k = 0; k < NK; ++k) {
        const __m256 av = _mm256_loadu_ps(a[k] + h);
        for (int t = 0; t < NT; ++t) acc[t * NK + k] = _mm256_fmadd_ps(xv[t], av, acc[t * NK + k]);
      }
    }
  }
  for (; i < d_in; i += 8) {  // the last < 16 columns
    const __m256i m = tail_mask8(d_in - i);
    __m256 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_maskload_ps(x[t] + i, m);
    for (int k = 0; k < NK; ++k) {
      const __m256 av = _mm256_maskload_ps(a[k] + i, m);
      for (int t = 0; t < NT; ++t) acc[t * NK + k] = _mm256_fmadd_ps(xv[t], av, acc[t * NK + k]);
    }
  }
  return sum_lanes8(acc);
}

struct TilesF32x8 {
  static constexpr int kLanes = 8, kStep = 16;  // kStep: elements of a row per step
  template <int NT, int NK>
  static void tile(const float* const* x, const float* const* a, int64_t d_in, float* out,
                   const Lookahead& la) {
    _mm256_store_ps(out, dot_tile8<NT, NK>(x, a, d_in, la));
  }
};

template <>
void shrink_group<float>(const float* x, int64_t nt, const float* a, int64_t d_in, int64_t r,
                         int64_t r_max, float scaling, float* v, const float* next_a, int64_t next_rows) {
  shrink_by_tiles<TilesF32x8>(x, nt, a, d_in, r, r_max, scaling, v, next_a, next_rows);
}

// Few tokens: 8 rows of b at a time, each row's dot with v[t], reduced with sum_lanes8; b is
// prefetched kPrefetchB rows ahead so a segment's b streams from memory.
void expand_rows8(const float* b, int64_t r_max, int64_t r, const float* v, int64_t nt, float* y,
                  int64_t d_out, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    for (int64_t j = 0; j < 8; ++j) {
      const int64_t p = o + kPrefetchB + j;
      if (p < d_out) {  // prefetch stays inside this slot's b
        const char* row = reinterpret_cast<const char*>(b + p * r_max);
        for (int64_t k = 0; k < r; k += 16) _mm_prefetch(row + 4 * k, _MM_HINT_T0);
        if (reinterpret_cast<uintptr_t>(row) & 63) _mm_prefetch(row + 4 * (r - 1), _MM_HINT_T0);
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      const float* vt = v + t * r_max;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= r; k += 8) {
        const __m256 vv = _mm256_loadu_ps(vt + k);
        for (int j = 0; j < 8; ++j)
          acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(b + (o + j) * r_max + k), vv, acc[j]);
      }
      if (k < r) {
        const __m256i m = tail_mask8(r - k);  // never reads b past the rank
        const __m256 vv = _mm256_maskload_ps(vt + k, m);
        for (int j = 0; j < 8; ++j)
          acc[j] = _mm256_fmadd_ps(_mm256_maskload_ps(b + (o + j) * r_max + k, m), vv, acc[j]);
      }
      float* yt = y + t * d_out + o;
      _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), sum_lanes8(acc)));
    }
  }
  for (; o < o1; ++o)
    for (int64_t t = 0; t < nt; ++t) y[t * d_out + o] += dot(b + o * r_max, v + t * r_max, r);
}

// Expand tiles of up to 3 tokens x 4 vectors of 8 columns (N * M + N + 1 <= 16 registers):
//   run<N, M>: y[t, 8m .. 8m+8] += sum_k v[t, k] * bt[k, 8m ..]  for t < N, m < M, k < r.
struct ExpandF32x8 {
  static constexpr int kTokens = 3, kLanes = 8, kWidth = 32;
  template <int N, int M>
  static void run(const float* bt, int64_t ld, int64_t r, const float* v, int64_t r_max, float* y,
                  int64_t d_out) {
    __m256 acc[N][M];
    for (int t = 0; t < N; ++t)
      for (int m = 0; m < M; ++m) acc[t][m] = _mm256_setzero_ps();
    int64_t k = 0;  // r >= 1; as a for loop, GCC stored acc to memory on every step
    do {
      __m256 vk[N];
      for (int t = 0; t < N; ++t) vk[t] = _mm256_broadcast_ss(v + t * r_max + k);
      for (int m = 0; m < M; ++m) {
        const __m256 bk = _mm256_loadu_ps(bt + k * ld + 8 * m);
        for (int t = 0; t < N; ++t) acc[t][m] = _mm256_fmadd_ps(vk[t], bk, acc[t][m]);
      }
    } while (++k < r);
    for (int t = 0; t < N; ++t)
      for (int m = 0; m < M; ++m) {
        float* yt = y + t * d_out + 8 * m;
        _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), acc[t][m]));
      }
  }
};
using ExpandF32 = ExpandF32x8;

// Many tokens: per 32 rows of b, copy them once into bt [r, 32] (b transposed), then 3 tokens at a
// time y[t, o:o+32] += sum_k v[t, k] * bt[k] (12 accumulators, no horizontal sums).
template <>
void expand_segment<float>(const float* b, int64_t r_max, int64_t r, const float* v, int64_t nt,
                           float* y, int64_t d_out, int64_t o0, int64_t o1) {
  if (nt < kLongSegment) return expand_rows8(b, r_max, r, v, nt, y, d_out, o0, o1);
  thread_local std::vector<float> bt_buf;
  if ((int64_t)bt_buf.size() < 32 * r + 8) bt_buf.resize(32 * r + 8);
  float* bt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bt_buf.data()) + 31) & ~uintptr_t(31));
  for (int64_t ob = o0; ob < o1; ob += 32) {
    const int tiles = static_cast<int>(std::min<int64_t>(32, o1 - ob) / 8);
    for (int64_t j = 0; j < tiles * 8; ++j) {  // column k < r of each row
      const float* row = b + (ob + j) * r_max;
      for (int64_t k = 0; k < r; ++k) bt[k * 32 + j] = row[k];
    }
    expand_by_tiles<ExpandF32x8>(tiles, bt, 32, r, v, r_max, nt, y + ob, d_out);
    for (int64_t o = ob + tiles * 8; o < std::min(ob + 32, o1); ++o)  // d_out % 8 leftovers
      for (int64_t t = 0; t < nt; ++t) y[t * d_out + o] += dot(b + o * r_max, v + t * r_max, r);
  }
}
constexpr bool kTiledFloat = true;
#else
constexpr bool kTiledFloat = false;
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// fp32 lora_b stored transposed: blocks of kWidth columns through the ISA's fp32 register tiles.
template <>
void expand_segment_t<float>(const float* bt, int64_t r, const float* v, int64_t r_max, int64_t nt,
                             float* y, int64_t d_out, int64_t o0, int64_t o1, NextB<float> next) {
  expand_t_by_tiles<RunDirect<ExpandF32>, ExpandF32::kWidth, ExpandF32::kLanes>(bt, r, v, r_max, nt, y,
                                                                                 d_out, o0, o1, next);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
// bf16 with AVX512_BF16: the same structure as fp32, accumulating in fp32.
//   shrink: _mm512_dpbf16_ps on pairs of bf16 of x and lora_a (exact products, fp32 sums);
//   expand: lora_b converted to fp32 in registers (bf16 -> fp32 is exact), v stays fp32, and y is
//           read, updated in fp32 and rounded once to bf16 (round to nearest even).
constexpr int64_t kPrefetchA16 = 512;  // bf16 elements ahead in a row of lora_a (1 KiB, as fp32)

inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1); }

// 16 bf16 (as 16-bit lanes) -> 16 fp32, exactly.
inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load_bf16(const uint16_t* p) {
  return bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 maskz_load_bf16(__mmask16 m, const uint16_t* p) {
  return bf16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}
// out[t * NK + k] = x[t] @ a[k] over d_in, for NT tokens x NK rows, 32 bf16 per step.
template <int NT, int NK>
inline __m512 dot_tile_bf16(const uint16_t* const* x, const uint16_t* const* a, int64_t d_in,
                            const Lookahead& la) {
  static_assert(NT * NK == 16, "one accumulator per output lane");
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d_in; i += 32) {
    la.step(i / 32);
    const __mmask32 m = tail_mask32(d_in - i);
    __m512bh xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x[t] + i));
    for (int k = 0; k < NK; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(a[k] + i + kPrefetchA16), _MM_HINT_T0);
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, a[k] + i));
      for (int t = 0; t < NT; ++t) acc[t * NK + k] = _mm512_dpbf16_ps(acc[t * NK + k], xv[t], av);
    }
  }
  return sum_lanes16(acc);
}

struct TilesBF16x16 {
  static constexpr int kLanes = 16, kStep = 32;  // kStep: elements of a row per step
  template <int NT, int NK>
  static void tile(const uint16_t* const* x, const uint16_t* const* a, int64_t d_in, float* out,
                   const Lookahead& la) {
    _mm512_store_ps(out, dot_tile_bf16<NT, NK>(x, a, d_in, la));
  }
};

template <>
void shrink_group<c10::BFloat16>(const c10::BFloat16* x_, int64_t nt, const c10::BFloat16* a_,
                                 int64_t d_in, int64_t r, int64_t r_max, float scaling, float* v,
                                 const c10::BFloat16* next_a, int64_t next_rows) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x_);
  const uint16_t* a = reinterpret_cast<const uint16_t*>(a_);
  shrink_by_tiles<TilesBF16x16>(x, nt, a, d_in, r, r_max, scaling, v,
                                reinterpret_cast<const uint16_t*>(next_a), next_rows);
}

// Few tokens: as expand_rows, with b's rows converted to fp32 in registers.
void expand_rows_bf16(const c10::BFloat16* b_, int64_t r_max, int64_t r, const float* v, int64_t nt,
                      c10::BFloat16* y_, int64_t d_out, int64_t o0, int64_t o1) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(b_);
  uint16_t* y = reinterpret_cast<uint16_t*>(y_);
  int64_t o = o0;
  const int64_t pf_end = d_out;  // prefetch stays inside this slot's b
  for (; o + 16 <= o1; o += 16) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t p = o + kPrefetchB + j;
      if (p < pf_end) {
        const char* row = reinterpret_cast<const char*>(b + p * r_max);
        for (int64_t k = 0; k < r; k += 32) _mm_prefetch(row + 2 * k, _MM_HINT_T0);
        _mm_prefetch(row + 2 * (r - 1), _MM_HINT_T0);
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      const float* vt = v + t * r_max;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < r; k += 16) {
        const __mmask16 m = tail_mask(r - k);  // never reads b past the rank
        const __m512 vv = _mm512_maskz_loadu_ps(m, vt + k);
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_fmadd_ps(maskz_load_bf16(m, b + (o + j) * r_max + k), vv, acc[j]);
      }
      add_store16(y + t * d_out + o, sum_lanes16(acc));
    }
  }
  for (; o < o1; ++o)
    for (int64_t t = 0; t < nt; ++t) {
      c10::BFloat16& out = y_[t * d_out + o];
      out = static_cast<float>(out) + dot(b_ + o * r_max, v + t * r_max, r);
    }
}

// ExpandX16's tiles with y in bf16, and lora_b stored transposed in bf16 widened per block.
struct ExpandBF16x16 : ExpandX16<uint16_t> {
  // bt in bf16 (ld apart): its `vectors` x 16 columns of rows k < r widened once to fp32, then run.
  static void convert_and_run(int vectors, const c10::BFloat16* bt_, int64_t ld, int64_t r,
                              const float* v, int64_t r_max, int64_t nt, c10::BFloat16* y_,
                              int64_t d_out) {
    const uint16_t* bt = reinterpret_cast<const uint16_t*>(bt_);
    thread_local std::vector<float> buf;
    if ((int64_t)buf.size() < 64 * r + 16) buf.resize(64 * r + 16);
    float* bf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t k = 0; k < r; ++k)
      for (int m = 0; m < vectors; ++m) _mm512_store_ps(bf + k * 64 + 16 * m, load_bf16(bt + k * ld + 16 * m));
    expand_by_tiles<ExpandBF16x16>(vectors, bf, 64, r, v, r_max, nt, reinterpret_cast<uint16_t*>(y_), d_out);
  }
};

template <>
void expand_segment_t<c10::BFloat16>(const c10::BFloat16* bt, int64_t r, const float* v, int64_t r_max,
                                     int64_t nt, c10::BFloat16* y, int64_t d_out, int64_t o0, int64_t o1,
                                     NextB<c10::BFloat16> next) {
  expand_t_by_tiles<ExpandBF16x16, 64, 16>(bt, r, v, r_max, nt, y, d_out, o0, o1, next);
}

// Many tokens: as expand_segment<float>, gathering 64 rows of b into bt [r, 64] fp32. Each 32-bit
// gather reads two neighbouring bf16 of a row, both < r: columns (0, 1) for k = 0, else (k - 1, k).
template <>
void expand_segment<c10::BFloat16>(const c10::BFloat16* b_, int64_t r_max, int64_t r, const float* v,
                                   int64_t nt, c10::BFloat16* y_, int64_t d_out, int64_t o0, int64_t o1) {
  if (nt < kLongSegment || r < 2) return expand_rows_bf16(b_, r_max, r, v, nt, y_, d_out, o0, o1);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(b_);
  uint16_t* y = reinterpret_cast<uint16_t*>(y_);
  alignas(64) static thread_local float bt_small[64 * 64];
  thread_local std::vector<float> bt_big;
  float* bt = bt_small;
  if (r > 64) {
    if ((int64_t)bt_big.size() < 64 * r + 16) bt_big.resize(64 * r + 16);
    bt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bt_big.data()) + 63) & ~uintptr_t(63));
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(r_max)));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t ob = o0; ob < o1; ob += 64) {
    const int tiles = static_cast<int>(std::min<int64_t>(64, o1 - ob) / 16);
    for (int m = 0; m < tiles; ++m) {
      const uint16_t* bm = b + (ob + 16 * m) * r_max;
      const __m512i c01 = _mm512_i32gather_epi32(idx, bm, 2);  // columns 0 (low half) and 1
      _mm512_store_ps(bt + 16 * m, _mm512_castsi512_ps(_mm512_slli_epi32(c01, 16)));
      for (int64_t k = 1; k < r; ++k) {  // columns k - 1 and k < r of 16 rows; keep k (high half)
        const __m512i g = _mm512_i32gather_epi32(idx, bm + k - 1, 2);
        _mm512_store_ps(bt + k * 64 + 16 * m, _mm512_castsi512_ps(_mm512_and_si512(g, hi)));
      }
    }
    expand_by_tiles<ExpandBF16x16>(tiles, bt, 64, r, v, r_max, nt, y + ob, d_out);
    for (int64_t o = ob + tiles * 16; o < std::min(ob + 64, o1); ++o)  // d_out % 16 leftovers
      for (int64_t t = 0; t < nt; ++t) {
        c10::BFloat16& out = y_[t * d_out + o];
        out = static_cast<float>(out) + dot(b_ + o * r_max, v + t * r_max, r);
      }
  }
}
constexpr bool kTiledBFloat16 = true;
#else
constexpr bool kTiledBFloat16 = false;
#endif

// Splits items with costs into n contiguous runs of about equal cost: item range of part p is
// [bounds[p], bounds[p + 1]).
template <typename Cost>
void balance(int64_t items, int n, Cost cost, std::vector<int64_t>& bounds) {
  std::vector<double> prefix(items + 1, 0.0);
  for (int64_t i = 0; i < items; ++i) prefix[i + 1] = prefix[i] + cost(i);
  bounds.assign(n + 1, items);
  bounds[0] = 0;
  int64_t i = 0;
  for (int p = 1; p < n; ++p) {
    const double target = prefix[items] * p / n;
    while (i < items && prefix[i + 1] <= target) ++i;
    // item i straddles target: give it to whichever side holds more of it
    bounds[p] = (i < items && target - prefix[i] > prefix[i + 1] - target) ? i + 1 : i;
    bounds[p] = std::max(bounds[p], bounds[p - 1]);
  }
}

// The shrink phase's work: token groups (<= kGroup tokens of one segment), cut into `parts` runs
// of about equal cost (bytes of adapter read + FMAs: rank * (tokens + 4) per unit of d_in).
struct ShrinkPlan {
  struct Group { const Segment* seg; int64_t t; };
  std::vector<Group> groups;
  std::vector<int64_t> bounds;  // run p = groups[bounds[p] : bounds[p + 1]]

  ShrinkPlan(const Segment* segs, int64_t n_segs, int parts) {
    for (const Segment* seg = segs; seg != segs + n_segs; ++seg)
      for (int64_t t = seg->begin; t < seg->end; t += kGroup) groups.push_back({seg, t});
    balance(groups.size(), parts, [&](int64_t i) {
      return double(groups[i].seg->rank) * (std::min(kGroup, groups[i].seg->end - groups[i].t) + 4);
    }, bounds);
  }

  // v[t, :r] = scaling * x[t] @ lora_a[slot, :r].T for the tokens of run p.
  template <typename scalar_t>
  void run(int p, const scalar_t* x, const scalar_t* a, int64_t d_in, int64_t r_max, float* v) const {
    for (int64_t i = bounds[p]; i < bounds[p + 1]; ++i) {
      const Segment* seg = groups[i].seg;
      const int64_t t = groups[i].t;
      const Segment* next = i + 1 < bounds[p + 1] ? groups[i + 1].seg : nullptr;  // for Lookahead
      shrink_group(x + t * d_in, std::min(kGroup, seg->end - t), a + seg->slot * r_max * d_in, d_in,
                   seg->rank, r_max, seg->scaling, v + t * r_max,
                   next != nullptr ? a + next->slot * r_max * d_in : nullptr, next != nullptr ? next->rank : 0);
    }
  }
};

// One segment's update of y's columns [o0, o1), in lora_b's layout: [S, d_out, r_max] row-major, or
// stored transposed ([S, r_max, d_out] in memory) when b_t. Either way slot s starts s * d_out * r_max in.
template <typename scalar_t>
inline void expand_any(const scalar_t* bp, bool b_t, const Segment& seg, int64_t r_max, const float* vp,
                       scalar_t* yp, int64_t d_out, int64_t o0, int64_t o1,
                       const Segment* next = nullptr, int64_t next_o0 = 0) {
  const scalar_t* b = bp + seg.slot * d_out * r_max;
  const float* v = vp + seg.begin * r_max;
  scalar_t* y = yp + seg.begin * d_out;
  if (b_t) {
    NextB<scalar_t> nb;
    if (next != nullptr) nb = {bp + next->slot * d_out * r_max, next->rank, next_o0};
    expand_segment_t(b, seg.rank, v, r_max, seg.end - seg.begin, y, d_out, o0, o1, nb);
  } else {
    expand_segment(b, r_max, seg.rank, v, seg.end - seg.begin, y, d_out, o0, o1);
  }
}

// A buffer of at least n floats for v, reused across calls on this thread.
inline float* v_buffer(int64_t n) {
  thread_local std::vector<float> buf;
  if ((int64_t)buf.size() < n) buf.resize(n);
  return buf.data();
}

// Shrink then expand for segs, accumulating into y in place, in one parallel region:
//   shrink: token groups (<= kGroup tokens of one segment) split into equal-cost runs;
//   barrier;
//   expand: (segment, 16 rows of y) units split into equal-cost runs, so each run walks whole
//           stretches of a segment's lora_b in order.
// Threads claim runs from a shared counter, kPartsPerThread runs per thread and phase.
template <typename scalar_t>
void lora_segments(const LoraCall& c) {
  const int64_t d_in = c.d_in, d_out = c.d_out, r_max = c.r_max;
  const bool b_t = c.b_t;
  const Segment* segs = c.segs;
  const scalar_t* xp = static_cast<const scalar_t*>(c.x);
  const scalar_t* ap = static_cast<const scalar_t*>(c.lora_a);
  const scalar_t* bp = static_cast<const scalar_t*>(c.lora_b);
  scalar_t* yp = static_cast<scalar_t*>(c.y);
  float* vp = v_buffer(c.T * r_max);

  const int n = c.threads;
  // Each phase is cut into kPartsPerThread * n runs of about equal cost, claimed by the threads
  // from a shared counter: on a shared machine one thread often runs slower than the other, and
  // claiming lets the faster thread take more runs instead of waiting at the barrier.
  const int parts = n == 1 ? 1 : kPartsPerThread * n;
  const ShrinkPlan shrink(segs, c.n_segs, parts);
  std::vector<int64_t> eb;
  const int64_t blocks = (d_out + 15) / 16;  // units of 16 rows per segment
  balance(c.n_segs * blocks, parts, [&](int64_t u) {
    const Segment& s = segs[u / blocks];
    return double(s.rank) * (std::min<int64_t>(s.end - s.begin, 16) + 4);
  }, eb);

  auto expand = [&](int p) {
    for (int64_t u = eb[p]; u < eb[p + 1];) {
      const int64_t g = u / blocks, blk = u % blocks;
      const int64_t u_end = std::min(eb[p + 1], (g + 1) * blocks);
      const int64_t o0 = blk * 16, o1 = std::min(d_out, (u_end - g * blocks) * 16);
      // this run goes on with the next segment from column 0: its start is prefetched
      expand_any(bp, b_t, segs[g], r_max, vp, yp, d_out, o0, o1,
                 u_end < eb[p + 1] ? &segs[g + 1] : nullptr, 0);
      u = u_end;
    }
  };
  if (n == 1) {
    shrink.run(0, xp, ap, d_in, r_max, vp);
    expand(0);
    return;
  }
  std::atomic<int> next_shrink{0}, next_expand{0};
#pragma omp parallel num_threads(n)
  {
    for (int p; (p = next_shrink.fetch_add(1, std::memory_order_relaxed)) < parts;)
      shrink.run(p, xp, ap, d_in, r_max, vp);
#pragma omp barrier
    for (int p; (p = next_expand.fetch_add(1, std::memory_order_relaxed)) < parts;) expand(p);
  }
}

constexpr int64_t kColumnBlock = 128;          // columns of y per base-matmul block

// Few tokens in fp32: the base matmul is compute-bound and the LoRA update memory-bound (each
// adapter is read for one or two tokens), so they are interleaved to overlap instead of following
// each other. The columns of y are cut into blocks; one parallel region runs two phases, each a
// list of tasks claimed in order by the threads, alternating compute-bound and memory-bound ones:
//   1: shrink runs (streaming lora_a), alternated with the base matmul of the first half of the
//      blocks: y[:, blk] = x @ weight[blk].T + bias[blk], one single-threaded sgemm each;
//   (barrier: v complete)
//   2: the expand of each block for every segment (streaming lora_b), alternated with the base
//      matmul + expand of the other half.
// While one thread is inside an sgemm, the other streams adapters, and each block of y is still
// in cache when its expand adds to it.
void lora_linear_interleaved(const LoraCall& c, const float* wp, const float* bias) {
  const int64_t T = c.T, d_in = c.d_in, d_out = c.d_out, r_max = c.r_max;
  const bool b_t = c.b_t;
  const Segment* segs = c.segs;
  const bool no_segs = c.n_segs == 0;
  const float* xp = static_cast<const float*>(c.x);
  const float* ap = static_cast<const float*>(c.lora_a);
  const float* bp = static_cast<const float*>(c.lora_b);
  float* yp = static_cast<float*>(c.y);
  float* vp = v_buffer(T * r_max);

  const int n = c.threads;
  const int parts = n == 1 ? 1 : kPartsPerThread * n;
  const ShrinkPlan shrink(segs, c.n_segs, parts);
  const int64_t blocks = (d_out + kColumnBlock - 1) / kColumnBlock;
  const int64_t early = no_segs ? blocks : blocks / 2;  // blocks multiplied in phase 1

  // x.T is packed once (the first task) for MKL's sgemm_compute, so the blocks' GEMMs do not each
  // copy x again: at d_in = 2048 those copies cost a quarter of the single-threaded GEMM time.
  const bool pack = cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
                    cblas_sgemm_compute != nullptr;
  // MKL sizes the buffer generously (~7 MiB beyond x itself); it is allocated once per thread and not
  // zero-filled, so only the pages MKL writes are ever touched.
  thread_local std::unique_ptr<float[]> packed_buf;
  thread_local size_t packed_floats = 0;
  if (pack) {
    const size_t floats = cblas_sgemm_pack_get_size(kBMatrix, kColumnBlock, T, d_in) / sizeof(float) + 16;
    if (packed_floats < floats) packed_buf.reset(new float[packed_floats = floats]);
  }
  float* xpacked = pack ? packed_buf.get() : nullptr;
  std::atomic<bool> x_packed{false};
  auto pack_x = [&] {
    cblas_sgemm_pack(kColMajor, kBMatrix, kNoTrans, kColumnBlock, T, d_in, 1.f, xp, d_in, xpacked);
    x_packed.store(true, std::memory_order_release);
  };
  auto gemm = [&](int64_t j) {
    const int64_t o0 = j * kColumnBlock, nb = std::min(kColumnBlock, d_out - o0);
    if (bias != nullptr)
      for (int64_t t = 0; t < T; ++t) std::copy(bias + o0, bias + o0 + nb, yp + t * d_out + o0);
    // column-major view: y.T[blk] (nb x T, ld d_out) = weight[blk] (d_in x nb, ld d_in)^T @ x.T
    const int m = nb, nn = T, k = d_in, lda = d_in, ldb = d_in, ldc = d_out;
    const float one = 1.f, beta = bias != nullptr ? 1.f : 0.f;
    if (pack) {
      while (!x_packed.load(std::memory_order_acquire)) std::this_thread::yield();
      cblas_sgemm_compute(kColMajor, kTrans, kPacked, m, nn, k, wp + o0 * d_in, lda, xpacked, ldb, beta,
                          yp + o0, ldc);
    } else {
      sgemm_("T", "N", &m, &nn, &k, &one, wp + o0 * d_in, &lda, xp, &ldb, &beta, yp + o0, &ldc);
    }
  };
  auto expand = [&](int64_t j) {
    const int64_t o0 = j * kColumnBlock, o1 = std::min(d_out, o0 + kColumnBlock);
    for (const Segment* seg = segs; seg != segs + c.n_segs; ++seg)
      expand_any(bp, b_t, *seg, r_max, vp, yp, d_out, o0, o1);
  };
  enum Kind { kPackX, kShrink, kGemm, kExpand, kGemmExpand };
  using Task = std::pair<Kind, int64_t>;  // (kind, shrink run or column block)
  std::vector<Task> first, second;
  if (pack) first.push_back({kPackX, 0});
  for (int64_t i = 0, js = 0; i < parts || js < early; ++i) {
    if (i < parts && !no_segs) first.push_back({kShrink, i});
    if (js < early) first.push_back({kGemm, js++});
  }
  const int64_t expands = no_segs ? 0 : early;  // blocks whose expand is left for phase 2
  for (int64_t je = 0, jb = early; je < expands || jb < blocks;) {
    if (jb < blocks) second.push_back({kGemmExpand, jb++});
    if (je < expands) second.push_back({kExpand, je++});
  }
  auto run = [&](const Task& task) {
    switch (task.first) {
      case kPackX: pack_x(); break;
      case kShrink: shrink.run(static_cast<int>(task.second), xp, ap, d_in, r_max, vp); break;
      case kGemm: gemm(task.second); break;
      case kExpand: expand(task.second); break;
      case kGemmExpand: gemm(task.second); expand(task.second); break;
    }
  };
  if (n == 1) {
    for (const Task& t : first) run(t);
    for (const Task& t : second) run(t);
    return;
  }
  std::atomic<int64_t> next_first{0}, next_second{0};
  const int64_t n_first = first.size(), n_second = second.size();
#pragma omp parallel num_threads(n)
  {
    for (int64_t i; (i = next_first.fetch_add(1, std::memory_order_relaxed)) < n_first;) run(first[i]);
#pragma omp barrier
    for (int64_t i; (i = next_second.fetch_add(1, std::memory_order_relaxed)) < n_second;) run(second[i]);
  }
}


}  // namespace

// This file's kernels, for the driver's dispatch.
extern const IsaKernels OPENLORA_ISA_TABLE;
const IsaKernels OPENLORA_ISA_TABLE = {
    kTiledFloat, kTiledBFloat16,
    &lora_segments<float>, &lora_segments<c10::BFloat16>,
    &lora_linear_interleaved,
};

}  // namespace OPENLORA_ISA
}  // namespace openlora
