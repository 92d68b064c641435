// openlora::paged_attention_decode: one query token per sequence attending its paged K/V in place.
//
//   for n, h:                                      # q [N, H, D], out [N, H, D] (q's dtype)
//     c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
//     keys t in [lo, c) live at k_cache[block_tables[n, t // bs], t % bs, h // (H / KVH)]
//     out[n, h] = softmax(scale * q[n, h] @ K[lo:c].T) @ V[lo:c]
//
// CPU kernel: one work item per sequence (or per group of its kv heads, when there are too few
// sequences to keep every thread busy), split over threads with at::parallel_for. An item walks its
// blocks once, chunk by chunk, keeping an online softmax (running max m, sum l, fp32 accumulator acc)
// for every query head of its kv heads, so each K/V row is read from memory once, whole, and the
// next chunk's rows are prefetched while this one is computed. fp32 and
// bf16 caches, fp32 accumulation. Keys go in chunks of kChunk: score the chunk, update the softmax,
// add the chunk's V rows. With AVX-512, a chunk's scores are computed 16 keys x one head at a time
// (lane sums by one 16x16 transpose-and-add) and exponentiated 16 at a time (exp16); otherwise
// `omp simd` loops and std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "paged_attention_checks.h"
#include "simd512.h"

namespace openlora {
namespace {

constexpr int64_t kMaxGroup = 16;     // query heads per kv head handled in one pass
constexpr int64_t kMaxHeads = 64;     // query heads per work item (over its kv heads)
constexpr int64_t kChunk = 32;        // keys scored before each online-softmax update
constexpr int64_t kMinTaskWork = 1 << 15;  // multiply-adds per parallel task, at least

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
      for (int64_t d = 0; d < D; ++d) sum += qi[d] * static_cast<float>(k[j][d]);
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
      for (int64_t d = 0; d < D; ++d) a[d] += pi * static_cast<float>(v[t][d]);
    }
}
#endif

struct CacheView {
  int64_t block, row, head;  // element strides of k_cache / v_cache dims 0..2 (dim 3 is contiguous)
};

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
  for (int64_t i = 0; i < heads * D; ++i) qf[i] = scale * static_cast<float>(q[i]);
  std::fill(acc, acc + heads * D, 0.f);
  float m[kMaxHeads], l[kMaxHeads];
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
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = static_cast<scalar_t>(acc[i * D + d] * inv);
  }
}

at::Tensor paged_attention_decode_cpu(const at::Tensor& q_, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables_,
                                      const at::Tensor& context_lens_, double scale,
                                      int64_t sliding_window) {
  TORCH_CHECK(q_.dim() == 3, "q must be 3-D [N, H, D], got shape ", q_.sizes());
  TORCH_CHECK(q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16 on CPU, got ", q_.scalar_type());
  check_paged_attention_args(q_, k_cache, v_cache, block_tables_, context_lens_, sliding_window);
  const int64_t N = q_.size(0), H = q_.size(1), D = q_.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH;
  TORCH_CHECK(G <= kMaxGroup, "q's heads per kv head H / KVH = ", G, " must be <= ", kMaxGroup);

  const auto q = q_.contiguous();
  const auto block_tables = block_tables_.contiguous();
  const auto context_lens = context_lens_.contiguous();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  const auto checked =
      check_paged_attention_values(tables, ctx, N, max_blocks, bs, num_blocks, sliding_window);
  const std::vector<int64_t>& lo = checked.first;
  const int64_t keys = checked.second;

  auto out = at::empty({N, H, D}, q.options());
  if (N == 0) return out;
  const CacheView ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheView vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  // Work items: (sequence, group of nkv kv heads). All of a sequence's kv heads in one item where
  // that leaves every thread a few items; otherwise fewer heads per item (down to one).
  const int64_t threads = at::get_num_threads();
  int64_t nkv = KVH;
  while (nkv > 1 && (N * (KVH / nkv) < 4 * threads || nkv * G > kMaxHeads)) {
    int64_t d = nkv - 1;
    while (KVH % d != 0) --d;  // the next smaller divisor of KVH
    nkv = d;
  }
  const int64_t groups = KVH / nkv, items = N * groups;
  const int64_t work_per_item = std::max<int64_t>(1, keys / N * nkv * G * D * 2);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / work_per_item);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      // qf [nkv * G, D], acc [nkv * G, D], scores [G, kChunk]
      std::vector<float> buf(2 * nkv * G * D + kChunk * G);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t n = it / groups, kv0 = (it % groups) * nkv;
        const int64_t off = (n * H + kv0 * G) * D;
        attend_heads<scalar_t>(qp + off, kp, vp, ks, vs, tables + n * max_blocks, lo[n], ctx[n], bs,
                               kv0, nkv, G, D, static_cast<float>(scale), op + off, buf.data(),
                               buf.data() + nkv * G * D, buf.data() + 2 * nkv * G * D);
      }
    });
  };
  if (q.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("paged_attention_decode", &paged_attention_decode_cpu);
  m.impl("paged_attention_decode_async", &paged_attention_decode_cpu);
}

}  // namespace openlora
