// openlora::paged_attention_decode: one query token per sequence attending its paged K/V in place.
//
//   for n, h:                                      # q [N, H, D], out [N, H, D] (q's dtype)
//     c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
//     keys t in [lo, c) live at k_cache[block_tables[n, t // bs], t % bs, h // (H / KVH)]
//     out[n, h] = softmax(scale * q[n, h] @ K[lo:c].T) @ V[lo:c]
//
// CPU kernel: one work item per (sequence, kv head), split over threads with at::parallel_for. An
// item walks its blocks once, keeping an online softmax (running max m, sum l, fp32 accumulator acc)
// for all H / KVH query heads of the kv head, so each K/V row is read from memory once. fp32 and
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

#include "simd512.h"

namespace openlora {
namespace {

constexpr int64_t kMaxGroup = 16;     // query heads per kv head handled in one pass
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

// acc[i] += sum_t p[i * kChunk + t] * v[t] over D, for i < G, t < nt.  acc: [G, D] fp32; each 16
// lanes of acc stay in registers while the nt rows of v stream past.
template <typename scalar_t>
inline void axpy_heads(float* acc, int64_t G, const float* p, const scalar_t* const* v, int64_t nt,
                       int64_t D) {
  __m512 a[kMaxGroup];
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    for (int64_t i = 0; i < G; ++i) a[i] = load16(acc + i * D + d, m);
    for (int64_t t = 0; t < nt; ++t) {
      const __m512 vv = load16(v[t] + d, m);
      for (int64_t i = 0; i < G; ++i)
        a[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * kChunk + t]), vv, a[i]);
    }
    for (int64_t i = 0; i < G; ++i) _mm512_mask_storeu_ps(acc + i * D + d, m, a[i]);
  }
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

// One (sequence, kv head): out rows [G, D] for the G query heads of kv head `kvh`.
template <typename scalar_t>
void attend_one(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, CacheView ks,
                CacheView vs, const int32_t* table, int64_t lo, int64_t hi, int64_t bs, int64_t kvh,
                int64_t G, int64_t D, float scale, scalar_t* out, float* qf, float* acc,
                float* scores) {
  for (int64_t i = 0; i < G * D; ++i) qf[i] = scale * static_cast<float>(q[i]);
  std::fill(acc, acc + G * D, 0.f);
  float m[kMaxGroup], l[kMaxGroup];
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  const scalar_t* krows[kChunk];
  const scalar_t* vrows[kChunk];
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {  // scores [G, kChunk], then one softmax update
    const int64_t nk = std::min(hi, c0 + kChunk) - c0;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t t = c0 + j, b = table[t / bs];
      krows[j] = kc + b * ks.block + (t % bs) * ks.row + kvh * ks.head;
      vrows[j] = vc + b * vs.block + (t % bs) * vs.row + kvh * vs.head;
    }
    score_chunk(qf, G, krows, nk, D, scores);
    for (int64_t i = 0; i < G; ++i) {
      float* s = scores + i * kChunk;
      const float mx = max_of(s, nk, m[i]);
      const float alpha = std::exp(m[i] - mx);  // exp(-inf) = 0 on the first chunk
      m[i] = mx;
      l[i] = l[i] * alpha + exp_sum(s, nk, mx);
      if (alpha != 1.f) {
        float* a = acc + i * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    axpy_heads(acc, G, scores, vrows, nk, D);
  }
  for (int64_t i = 0; i < G; ++i) {
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
  const int64_t N = q_.size(0), H = q_.size(1), D = q_.size(2);
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->dim() == 4 && t->size(3) == D,
                name, " must be [num_blocks, block_size, KVH, D] with D = ", D, ", got shape ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == q_.scalar_type(), name, " must have q's dtype ",
                q_.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q_.device(), name, " must be on q's device ", q_.device(), ", got ",
                t->device());
    TORCH_CHECK(t->stride(3) == 1 || D == 1, name, " must be contiguous in its last dim (D), got strides ",
                t->strides());
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "q's heads H = ", H,
              " must be a multiple of k_cache's kv heads KVH = ", KVH);
  const int64_t G = H / KVH;
  TORCH_CHECK(G <= kMaxGroup, "q's heads per kv head H / KVH = ", G, " must be <= ", kMaxGroup);
  TORCH_CHECK(block_tables_.dim() == 2 && block_tables_.size(0) == N,
              "block_tables must be [N, max_blocks] with N = ", N, ", got shape ",
              block_tables_.sizes());
  TORCH_CHECK(block_tables_.scalar_type() == at::kInt, "block_tables must be int32, got ",
              block_tables_.scalar_type());
  TORCH_CHECK(context_lens_.dim() == 1 && context_lens_.size(0) == N,
              "context_lens must be [N] with N = ", N, ", got shape ", context_lens_.sizes());
  TORCH_CHECK(context_lens_.scalar_type() == at::kInt, "context_lens must be int32, got ",
              context_lens_.scalar_type());
  for (const auto& [t, name] :
       {std::pair{&block_tables_, "block_tables"}, std::pair{&context_lens_, "context_lens"}})
    TORCH_CHECK(t->device() == q_.device(), name, " must be on q's device ", q_.device(), ", got ",
                t->device());
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0 = none), got ", sliding_window);

  const auto q = q_.contiguous();
  const auto block_tables = block_tables_.contiguous();
  const auto context_lens = context_lens_.contiguous();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  std::vector<int64_t> lo(N);
  int64_t keys = 0;
  for (int64_t n = 0; n < N; ++n) {  // values: every block that will be read must exist
    const int64_t c = ctx[n];
    TORCH_CHECK(c > 0 && c <= max_blocks * bs, "context_lens[", n, "] = ", c,
                " must be in [1, max_blocks * block_size = ", max_blocks * bs, "]");
    lo[n] = sliding_window > 0 ? std::max<int64_t>(0, c - sliding_window) : 0;
    for (int64_t j = lo[n] / bs; j <= (c - 1) / bs; ++j) {
      const int64_t b = tables[n * max_blocks + j];
      TORCH_CHECK(b >= 0 && b < num_blocks, "block_tables[", n, ", ", j, "] = ", b,
                  " is out of range [0, num_blocks = ", num_blocks, ")");
    }
    keys += c - lo[n];
  }

  auto out = at::empty({N, H, D}, q.options());
  if (N == 0) return out;
  const CacheView ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheView vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const int64_t items = N * KVH;
  const int64_t work_per_item = std::max<int64_t>(1, keys / N * G * D * 2);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / work_per_item);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * G * D + kChunk * G);  // qf [G, D], acc [G, D], scores [G, kChunk]
      for (int64_t it = begin; it < end; ++it) {
        const int64_t n = it / KVH, kvh = it % KVH;
        const int64_t off = (n * H + kvh * G) * D;
        attend_one<scalar_t>(qp + off, kp, vp, ks, vs, tables + n * max_blocks, lo[n], ctx[n], bs,
                             kvh, G, D, static_cast<float>(scale), op + off, buf.data(),
                             buf.data() + G * D, buf.data() + 2 * G * D);
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

// The schema is a fragment of the library TORCH_LIBRARY(openlora) declares in lora_linear.cpp.
TORCH_LIBRARY_FRAGMENT(openlora, m) {
  // out[n, h] = softmax(scale * q[n, h] @ K_n.T) @ V_n over n's last context_lens[n] (or window) keys.
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlora, CPU, m) { m.impl("paged_attention_decode", &paged_attention_decode_cpu); }

}  // namespace openlora
