// paged_attention_decode's per-item loop (what it computes and how the work is split: paged_attention.cpp),
// compiled once per instruction set (cpu_kernels_<isa>.cpp). With AVX-512, a chunk's scores are computed
// 16 keys x one head at a time (lane sums by one 16x16 transpose-and-add) and exponentiated 16 at a time
// (exp16); otherwise `omp simd` loops (ymm code under the AVX2 flags) and std::exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_kernels.h"
#include "simd512.h"
#include "simd_vec.h"

namespace openlora {
namespace OPENLORA_ISA {
namespace {

constexpr int64_t kChunk = kAttendChunk;

// Scores live per head: scores[i * kChunk + j] for key c0 + j of a chunk.
#if defined(__AVX512F__)
using simd::exp16;
using simd::load16;
using simd::sum_lanes16;
using simd::tail_mask;

// scores[i * kChunk + j] = q[i] @ k[j] for i < G, j < nk: per head, 16 keys at a time, each key's
// products summed across lanes by one sum_lanes16 (key pointers past nk repeat the last one).
template <typename scalar_t>
inline void score_chunk(const float* q, int64_t G, const scalar_t* const* k, int64_t nk, int64_t D,
                        float* scores) {
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, nk - j0);
    const scalar_t* kr[16];
    for (int64_t j = 0; j < 16; ++j) kr[j] = k[j0 + std::min(j, n - 1)];
    for (int64_t i = 0; i < G; ++i) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        const __m512 qv = load16(q + i * D + d, m);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(load16(kr[j] + d, m), qv, acc[j]);
      }
      _mm512_mask_storeu_ps(scores + i * kChunk + j0, tail_mask(n), sum_lanes16(acc));
    }
  }
}

inline float max_of(const float* s, int64_t n, float init) {
  __m512 mx = _mm512_set1_ps(init);
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - j), s + j));
  return _mm512_reduce_max_ps(mx);
}

// s[j] = e^(s[j] - mx) for j < n; returns their sum.
inline float exp_sum(float* s, int64_t n, float mx) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// acc[i] += sum_t p[i * kChunk + t] * v[t] over D, for i < GS (known at compile time), t < nt;
// acc: [GS, D] fp32. 64 columns at a time in GS x 4 accumulators that stay in registers while the nt
// rows of v stream past. (With a run-time head count the compiler kept the accumulators on the
// stack, so each multiply-add waited on a store and a load: decode attention ran 20-30% slower.)
template <int GS, typename scalar_t>
inline void axpy_group(float* acc, const float* p, const scalar_t* const* v, int64_t nt, int64_t D) {
  for (int64_t d = 0; d < D; d += 64) {
    __mmask16 m[4];
    for (int c = 0; c < 4; ++c) m[c] = D - d - 16 * c > 0 ? tail_mask(D - d - 16 * c) : 0;  // 0: nothing read
    __m512 a[GS][4];
    for (int i = 0; i < GS; ++i)
      for (int c = 0; c < 4; ++c) a[i][c] = load16(acc + i * D + d + 16 * c, m[c]);
    for (int64_t t = 0; t < nt; ++t) {
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = load16(v[t] + d + 16 * c, m[c]);
      for (int i = 0; i < GS; ++i) {
        const __m512 pi = _mm512_set1_ps(p[i * kChunk + t]);
        for (int c = 0; c < 4; ++c) a[i][c] = _mm512_fmadd_ps(pi, vv[c], a[i][c]);
      }
    }
    for (int i = 0; i < GS; ++i)
      for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(acc + i * D + d + 16 * c, m[c], a[i][c]);
  }
}

// Heads in groups of 4, then 2, then 1 (G = 7: 4 + 2 + 1); v's rows stay in L1 between groups.
template <typename scalar_t>
inline void axpy_heads(float* acc, int64_t G, const float* p, const scalar_t* const* v, int64_t nt,
                       int64_t D) {
  int64_t i = 0;
  for (; i + 4 <= G; i += 4) axpy_group<4>(acc + i * D, p + i * kChunk, v, nt, D);
  if (i + 2 <= G) {
    axpy_group<2>(acc + i * D, p + i * kChunk, v, nt, D);
    i += 2;
  }
  if (i < G) axpy_group<1>(acc + i * D, p + i * kChunk, v, nt, D);
}
#else
template <typename scalar_t>
inline void score_chunk(const float* q, int64_t G, const scalar_t* const* k, int64_t nk, int64_t D,
                        float* scores) {
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t i = 0; i < G; ++i) {
      const float* qi = q + i * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += qi[d] * to_float(k[j][d]);
      scores[i * kChunk + j] = sum;
    }
}

inline float max_of(const float* s, int64_t n, float init) {
  for (int64_t j = 0; j < n; ++j) init = std::max(init, s[j]);
  return init;
}

inline float exp_sum(float* s, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  return sum;
}

template <typename scalar_t>
inline void axpy_heads(float* acc, int64_t G, const float* p, const scalar_t* const* v, int64_t nt,
                       int64_t D) {
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t i = 0; i < G; ++i) {
      float* a = acc + i * D;
      const float pi = p[i * kChunk + t];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pi * to_float(v[t][d]);
    }
}
#endif


// Prefetches (into L2: a chunk of all an item's heads can outgrow L1) n rows of `bytes` each, whose first bytes rows[j] + offset.
inline void prefetch_rows(const void* const* rows, int64_t n, int64_t offset, int64_t bytes) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t o = 0; o < bytes; o += 64)
      _mm_prefetch(static_cast<const char*>(rows[j]) + offset + o, _MM_HINT_T1);
#endif
}

// One sequence's kv heads [kv0, kv0 + nkv): out rows [nkv * G, D] for their query heads. Each chunk
// of keys is scored, softmaxed and added for every kv head in turn, so the chunk's K/V rows (all
// nkv heads of each token, contiguous in the cache) are fetched from memory once and used at once,
// and the next chunk's rows are prefetched meanwhile. (Walking one kv head at a time over the whole
// context read 1/KVH of each token's row per pass, and the hardware prefetcher's fetches of the
// rest were evicted before their pass came.)
template <typename scalar_t>
void attend_heads(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, CacheView ks,
                  CacheView vs, const int32_t* table, int64_t lo, int64_t hi, int64_t bs,
                  int64_t kv0, int64_t nkv, int64_t G, int64_t D, float scale, scalar_t* out,
                  float* qf, float* acc, float* scores) {
  const int64_t heads = nkv * G;
  for (int64_t i = 0; i < heads * D; ++i) qf[i] = scale * to_float(q[i]);
  std::fill(acc, acc + heads * D, 0.f);
  float m[kAttendMaxHeads], l[kAttendMaxHeads];
  std::fill(m, m + heads, -std::numeric_limits<float>::infinity());
  std::fill(l, l + heads, 0.f);
  // token rows (kv head 0) of this chunk and the next; a head's rows are these + kvh * stride
  const scalar_t* krow[2][kChunk];
  const scalar_t* vrow[2][kChunk];
  const scalar_t* krows[kChunk];
  const scalar_t* vrows[kChunk];
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  // the bytes of this item's heads in a token's row: contiguous when heads are D apart
  const bool packed_heads = ks.head == D && vs.head == D;
  auto rows_of = [&](int64_t c0, int64_t nk, int which) {
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t t = c0 + j, b = table[t / bs];
      krow[which][j] = kc + b * ks.block + (t % bs) * ks.row;
      vrow[which][j] = vc + b * vs.block + (t % bs) * vs.row;
    }
  };
  auto prefetch = [&](int64_t nk, const scalar_t* const* rows, int64_t head_stride) {
    const void* const* r = reinterpret_cast<const void* const*>(rows);
    const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
    if (packed_heads) {
      prefetch_rows(r, nk, kv0 * head_stride * elem, nkv * row_bytes);
    } else {
      for (int64_t h = kv0; h < kv0 + nkv; ++h) prefetch_rows(r, nk, h * head_stride * elem, row_bytes);
    }
  };
  int cur = 0;
  rows_of(lo, std::min(hi, lo + kChunk) - lo, cur);
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {  // scores [G, kChunk], then one softmax update
    const int64_t nk = std::min(hi, c0 + kChunk) - c0;
    const int64_t nn = std::max<int64_t>(0, std::min(hi, c0 + 2 * kChunk) - c0 - kChunk);
    if (nn > 0) {
      rows_of(c0 + kChunk, nn, cur ^ 1);
      prefetch(nn, krow[cur ^ 1], ks.head);
    }
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t kvh = kv0 + h;
      for (int64_t j = 0; j < nk; ++j) {
        krows[j] = krow[cur][j] + kvh * ks.head;
        vrows[j] = vrow[cur][j] + kvh * vs.head;
      }
      float* qh = qf + h * G * D;
      float* ah = acc + h * G * D;
      score_chunk(qh, G, krows, nk, D, scores);
      if (h == 0 && nn > 0) prefetch(nn, vrow[cur ^ 1], vs.head);
      for (int64_t i = 0; i < G; ++i) {
        float* s = scores + i * kChunk;
        float& mi = m[h * G + i];
        float& li = l[h * G + i];
        const float mx = max_of(s, nk, mi);
        const float alpha = std::exp(mi - mx);  // exp(-inf) = 0 on the first chunk
        mi = mx;
        li = li * alpha + exp_sum(s, nk, mx);
        if (alpha != 1.f) {
          float* a = ah + i * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
        }
      }
      axpy_heads(ah, G, scores, vrows, nk, D);
    }
    cur ^= 1;
  }
  for (int64_t i = 0; i < heads; ++i) {
    const float inv = 1.f / l[i];
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = from_float<scalar_t>(acc[i * D + d] * inv);
  }
}

// One AttendItem (cpu_kernels.h): scratch holds qf [nkv * G, D], acc [nkv * G, D], scores [G, kChunk].
template <typename T>
void attend_item(const AttendItem& it) {
  float* qf = it.scratch;
  float* acc = qf + it.nkv * it.G * it.D;
  attend_heads<T>(static_cast<const T*>(it.q), static_cast<const T*>(it.kc), static_cast<const T*>(it.vc), it.ks,
                  it.vs, it.table, it.lo, it.hi, it.bs, it.kv0, it.nkv, it.G, it.D, it.scale, static_cast<T*>(it.out),
                  qf, acc, acc + it.nkv * it.G * it.D);
}

}  // namespace
}  // namespace OPENLORA_ISA
}  // namespace openlora
