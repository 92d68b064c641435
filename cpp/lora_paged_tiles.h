// lora_paged_add_'s two phases over raw pointers, compiled once per instruction set (cpu_kernels_<isa>.cpp;
// what the op computes and the page layout: lora_paged.cpp). For the segments of one call, per work item
// (segment, block of kRowBlock rows):
//
//   shrink:  t[i, k] = scaling * x[i] @ A[k]                    (i in the block, k < r)
//   expand:  y[i, :] += t[i, :r] @ Bt[:r, :]
//
// t is fp32 [T, r_max]; y is read and written once per (row, column) with one rounding. A and B^T are
// read in place from their pages: register tiles of NT tokens x NK rows of A (shrink: one accumulator
// vector per pair, summed across lanes at the end) and NT tokens x NV vectors of y's columns (expand:
// each page row of B^T broadcast-multiplied by t[i, k]), run along each page's contiguous run of
// d_in or d_out and cut at page ends. Items are independent: OpenMP threads claim them in order.
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>
#include <cstdint>
#include <type_traits>

#include "cpu_kernels.h"
#include "simd512.h"
#include "simd_vec.h"

namespace openlora {
namespace OPENLORA_ISA {
namespace {

constexpr int64_t kRowBlock = 32;   // tokens per work item

#if defined(__AVX512F__)
constexpr int kAcc = 16;            // accumulator registers a tile may hold
#elif defined(__AVX2__) || defined(__SSE2__)
constexpr int kAcc = 8;
#else
constexpr int kAcc = 4;
#endif

// Pages are scattered over the arena, so the hardware prefetchers lose each stream at a page's end
// (every 1-2 KiB); the tiles prefetch the next page of every row they stream, line by line as they
// read the current one, so its first lines are in flight before they are needed.
template <typename T>
inline void prefetch_line(const T* p) { __builtin_prefetch(p, 0, 2); }  // into L2: a next page per row

// One prefetch per 64-byte line of an n-element run starting at p, issued over one vector step.
template <typename T>
constexpr bool kLinePerStep = Vec::L * sizeof(T) >= 64;

// out[t * NK + k] = x_t[:d_in] @ A[k] for NT tokens (rows xs[t], repeated past the block) and NK rows of
// A (rows[k]: each row's ca page ids). next[k]: the page ids of the rows read after these (prefetched
// while the last page of these is read).
template <int NT, int NK, typename T, typename W>
inline void shrink_tile(const T* const* xs, const W* arena, const int32_t* const* rows,
                        const int32_t* const* next, int64_t ca, int64_t P, int64_t d_in, float* out) {
  typename Vec::R acc[NT][NK];
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < NK; ++k) acc[t][k] = Vec::zero();
  constexpr int64_t kLineElems = 64 / static_cast<int64_t>(sizeof(W));
  for (int64_t c = 0; c < ca; ++c) {
    const int64_t lo = c * P, len = std::min(P, d_in - lo);
    const W* a[NK];
    const W* pf[NK];
    for (int k = 0; k < NK; ++k) {
      a[k] = arena + static_cast<int64_t>(rows[k][c]) * P;
      pf[k] = arena + static_cast<int64_t>(c + 1 < ca ? rows[k][c + 1] : next[k][0]) * P;
    }
    const T* x[NT];
    for (int t = 0; t < NT; ++t) x[t] = xs[t] + lo;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16_bits> && std::is_same_v<W, bf16_bits>) {  // 32 bf16 products per instruction, summed in fp32
      int64_t j = 0;
      for (; j + 32 <= len; j += 32) {
        __m512bh av[NK];
        for (int k = 0; k < NK; ++k) {
          av[k] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(a[k] + j));
          prefetch_line(pf[k] + j);
        }
        for (int t = 0; t < NT; ++t) {
          const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x[t] + j));
          for (int k = 0; k < NK; ++k) acc[t][k] = _mm512_dpbf16_ps(acc[t][k], av[k], xv);
        }
      }
      if (j < len) {
        const __mmask32 m = len - j >= 32 ? ~0u : (1u << (len - j)) - 1;
        __m512bh av[NK];
        for (int k = 0; k < NK; ++k) av[k] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, a[k] + j));
        for (int t = 0; t < NT; ++t) {
          const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x[t] + j));
          for (int k = 0; k < NK; ++k) acc[t][k] = _mm512_dpbf16_ps(acc[t][k], av[k], xv);
        }
      }
      continue;
    }
#endif
    int64_t j = 0;
    for (; j + Vec::L <= len; j += Vec::L) {
      typename Vec::R av[NK];
      for (int k = 0; k < NK; ++k) av[k] = Vec::load(a[k] + j);
      if (kLinePerStep<W> || j % kLineElems == 0)
        for (int k = 0; k < NK; ++k) prefetch_line(pf[k] + j);
      for (int t = 0; t < NT; ++t) {
        const typename Vec::R xv = Vec::load(x[t] + j);
        for (int k = 0; k < NK; ++k) acc[t][k] = Vec::fma(av[k], xv, acc[t][k]);
      }
    }
    if (j < len) {
      typename Vec::R av[NK];
      for (int k = 0; k < NK; ++k) av[k] = Vec::load(a[k] + j, len - j);
      for (int t = 0; t < NT; ++t) {
        const typename Vec::R xv = Vec::load(x[t] + j, len - j);
        for (int k = 0; k < NK; ++k) acc[t][k] = Vec::fma(av[k], xv, acc[t][k]);
      }
    }
  }
#if defined(__AVX512F__)
  if constexpr (NT * NK == 16) {  // the 16 lane sums at once (a transpose-and-add), not one by one
    _mm512_storeu_ps(out, simd::sum_lanes16(&acc[0][0]));
    return;
  }
#endif
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < NK; ++k) out[t * NK + k] = Vec::sum(acc[t][k]);
}

// Page-id rows read one after another (row q: pages + min(q, n - 1) * stride), for prefetching the
// rows that come after a tile's: more of this segment's A, then its B^T rows' first pages.
struct RowList {
  const int32_t* pages;
  int64_t stride, n;
  const int32_t* row(int64_t q) const { return pages + std::min(q, n - 1) * stride; }
};

// t[row + t, k] for rows k0.. of A in groups of NK, then of NK / 2 ... 1 for the rest (no row computed
// twice), nt (<= NT) tokens. after: the rows read once these tokens' A rows are done.
template <int NT, int NK, typename T, typename W>
inline void shrink_rows(const PagedCall& c, const PagedSegment& s, const RowList& after, const T* const* xs,
                        int64_t row, int64_t nt, int64_t k0) {
  const W* arena = static_cast<const W*>(c.arena);
  float out[NT * NK];
  for (; k0 + NK <= s.rank; k0 += NK) {
    const int32_t* rows[NK];
    const int32_t* next[NK];
    for (int k = 0; k < NK; ++k) {
      rows[k] = s.a_pages + (k0 + k) * c.ca;
      const int64_t q = k0 + NK + k;
      next[k] = q < s.rank ? s.a_pages + q * c.ca : after.row(q - s.rank);
    }
    shrink_tile<NT, NK, T, W>(xs, arena, rows, next, c.ca, c.P, c.d_in, out);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t k = 0; k < NK; ++k) c.t[(row + t) * c.r_max + k0 + k] = s.scaling * out[t * NK + k];
  }
  if constexpr (NK > 1) {
    if (k0 < s.rank) shrink_rows<NT, NK / 2, T, W>(c, s, after, xs, row, nt, k0);
  }
}

// t[i, :r] for nt (<= NT) tokens of a segment starting at x row `row`.
template <int NT, typename T, typename W>
inline void shrink_tokens(const PagedCall& c, const PagedSegment& s, const RowList& after, int64_t row,
                          int64_t nt) {
  const T* x = static_cast<const T*>(c.x);
  const T* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = x + (row + std::min<int64_t>(t, nt - 1)) * c.d_in;
  shrink_rows<NT, std::max(1, kAcc / NT), T, W>(c, s, after, xs, row, nt, 0);
}

// t[row0 .. row1) of segment s; A is read once per group of (up to) 4 tokens, then B^T's first pages
// (what the expand reads first) are prefetched.
template <typename T, typename W>
void shrink_block(const PagedCall& c, const PagedSegment& s, int64_t row0, int64_t row1) {
  const RowList again{s.a_pages, c.ca, s.rank}, b_rows{s.b_pages, c.cb, s.rank};
  int64_t row = row0;
  for (; row + 4 <= row1; row += 4) shrink_tokens<4, T, W>(c, s, row + 4 < row1 ? again : b_rows, row, 4);
  if (row + 2 <= row1) {
    shrink_tokens<2, T, W>(c, s, row + 2 < row1 ? again : b_rows, row, 2);
    row += 2;
  }
  if (row < row1) shrink_tokens<1, T, W>(c, s, b_rows, row, 1);
}

// y[row + t, o .. o + n) += t[row + t, :r] @ Bt[:r, o .. o + n) for nt (<= NT) tokens, n <= NV * L
// columns, all inside page c of B^T's rows (at offset `in` within the page). The columns read next
// (page pf_page at offset pf_in, pf_page < 0: none) are prefetched meanwhile, row by row.
template <int NT, int NV, typename T, typename W>
inline void expand_tile(const PagedCall& c, const PagedSegment& s, int64_t row, int64_t nt, int64_t page,
                        int64_t in, int64_t o, int64_t n, int64_t pf_page, int64_t pf_in) {
  const W* arena = static_cast<const W*>(c.arena);
  T* y = static_cast<T*>(c.y);
  typename Vec::R acc[NT][NV];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = Vec::zero();
  const float* tv[NT];
  for (int t = 0; t < NT; ++t) tv[t] = c.t + (row + std::min<int64_t>(t, nt - 1)) * c.r_max;
  const bool full = n == NV * Vec::L;
  for (int64_t k = 0; k < s.rank; ++k) {
    const W* b = arena + static_cast<int64_t>(s.b_pages[k * c.cb + page]) * c.P + in;
    typename Vec::R bv[NV];
    for (int v = 0; v < NV; ++v)  // past n: zeros, nothing read
      bv[v] = full ? Vec::load(b + v * Vec::L) : Vec::load(b + v * Vec::L, n - v * Vec::L);
    if (pf_page >= 0) {
      const W* pf = arena + static_cast<int64_t>(s.b_pages[k * c.cb + pf_page]) * c.P + pf_in;
      for (int v = 0; v < NV; ++v)
        if (kLinePerStep<W> || (v * Vec::L * static_cast<int64_t>(sizeof(W))) % 64 == 0) prefetch_line(pf + v * Vec::L);
    }
    for (int t = 0; t < NT; ++t) {
      const typename Vec::R w = Vec::set1(tv[t][k]);
      for (int v = 0; v < NV; ++v) acc[t][v] = Vec::fma(w, bv[v], acc[t][v]);
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    T* yt = y + (row + t) * c.d_out + o;
    for (int v = 0; v < NV; ++v) {
      const int64_t left = n - v * Vec::L;
      if (left <= 0) break;
      if (left >= Vec::L) {
        Vec::store(yt + v * Vec::L, Vec::add(Vec::load(yt + v * Vec::L), acc[t][v]));
      } else {
        Vec::store(yt + v * Vec::L, Vec::add(Vec::load(yt + v * Vec::L, left), acc[t][v]), left);
      }
    }
  }
}

// Columns [o0, o1) of y for nt (<= NT) tokens: cut at page ends, then NV vectors at a time.
template <int NT, typename T, typename W>
inline void expand_tokens(const PagedCall& c, const PagedSegment& s, int64_t row, int64_t nt, int64_t o0,
                          int64_t o1) {
  constexpr int NV = NT == 1 ? 8 : std::max(1, kAcc / NT);
  constexpr int64_t kWidth = NV * Vec::L;
  for (int64_t o = o0; o < o1;) {
    const int64_t page = o / c.P, end = std::min(o1, (page + 1) * c.P);
    for (int64_t w; o < end; o += w) {
      w = std::min(kWidth, end - o);
      const int64_t next = o + w;  // the columns read next (this call's, or the next column tile's)
      expand_tile<NT, NV, T, W>(c, s, row, nt, page, o - page * c.P, o, w, next < c.d_out ? next / c.P : -1,
                             next % c.P);
    }
  }
}

template <typename T, typename W>
void expand_block(const PagedCall& c, const PagedSegment& s, int64_t row0, int64_t row1, int64_t o0, int64_t o1) {
  int64_t row = row0;
  for (; row + 4 <= row1; row += 4) expand_tokens<4, T, W>(c, s, row, 4, o0, o1);
  if (row + 2 <= row1) {
    expand_tokens<2, T, W>(c, s, row, 2, o0, o1);
    row += 2;
  }
  if (row < row1) expand_tokens<1, T, W>(c, s, row, 1, o0, o1);
}

// The first page of the first kAcc rows of s's A (what the next item reads first, while this item's
// expand runs: nothing else prefetches a segment's first pages).
template <typename W>
inline void prefetch_first_pages(const PagedCall& c, const PagedSegment& s) {
  constexpr int64_t kLineElems = 64 / static_cast<int64_t>(sizeof(W));
  const W* arena = static_cast<const W*>(c.arena);
  const int64_t n = std::min(c.P, c.d_in);
  for (int64_t k = 0; k < std::min<int64_t>(s.rank, kAcc); ++k) {
    const W* a = arena + static_cast<int64_t>(s.a_pages[k * c.ca]) * c.P;
    for (int64_t j = 0; j < n; j += kLineElems) prefetch_line(a + j);
  }
}

// T: x's and y's element type; W: the arena's (float32 x with bfloat16 pages: --lora-dtype).
template <typename T, typename W = T>
void paged_segments(const PagedCall& c) {
  // Work items: (segment, block of kRowBlock rows), each its shrink then its expand over all of y's
  // columns, so items are independent (no barrier between the phases: on a busy machine a barrier
  // waits for the slowest thread's time slice) and a block's t rows are still in L1 when expanded.
  struct Block { int32_t seg; int64_t row0, row1; };
  std::vector<Block> blocks;
  for (int64_t g = 0; g < c.n_segs; ++g) {
    const PagedSegment& s = c.segs[g];
    for (int64_t r = s.row0; r < s.row0 + s.rows; r += kRowBlock)
      blocks.push_back({static_cast<int32_t>(g), r, std::min(s.row0 + s.rows, r + kRowBlock)});
  }
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  auto run = [&](int64_t i) {
    const Block& b = blocks[i];
    const PagedSegment& s = c.segs[b.seg];
    shrink_block<T, W>(c, s, b.row0, b.row1);
    if (i + 1 < n_blocks) prefetch_first_pages<W>(c, c.segs[blocks[i + 1].seg]);
    expand_block<T, W>(c, s, b.row0, b.row1, 0, c.d_out);
  };
  const int threads = static_cast<int>(std::min<int64_t>(c.threads, n_blocks));
  if (threads <= 1) {
    for (int64_t i = 0; i < n_blocks; ++i) run(i);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_blocks;) run(i);
  }
}

}  // namespace
}  // namespace OPENLORA_ISA
}  // namespace openlora
