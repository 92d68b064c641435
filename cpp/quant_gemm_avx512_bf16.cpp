// The int8 / int4 base GEMMs for AVX512-BF16 (quant_gemm.h has the layout), compiled with its own flags
// (model/quant.py: ISA_FLAGS["avx512_bf16"]); quant_gemm.cpp calls it only on a CPU that has it.
//
// At 32 tokens a decode step's base GEMMs are compute-bound on one core, so weight-only dequantization
// to float32 gains nothing over the float32 GEMM. Here the weights' integers are exact in bfloat16,
// and vdpbf16ps takes 32 products an instruction (fp32 FMA: 16):
//   for each block of 48 output rows, each chunk of k (KC):
//     dequantize the rows' integers to bfloat16 into an L1/L2 buffer (int8: sign-extend, convert;
//       int4: 0x4300 | nibble = 128 + q, two instructions for 32 weights)
//     for each 8 tokens: acc[8 tokens][3 x 16 rows] += x[t, 2p:2p+2] (broadcast) . w[rows, 2p:2p+2]
//       folded per group into fin[t][rows]: int4 (acc - (128 + z) * sum_g x) * s, int8 acc (s at the end)
// Every product is exact; only the float32 sums round.
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__))
#error "quant_gemm_avx512_bf16.cpp must be compiled with ISA_FLAGS[\"avx512_bf16\"] (model/quant.py)"
#endif
#include "quant_gemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace openlora_quant {
namespace avx512_bf16 {
namespace {

// Scratch memory of a type of this file's own: no std:: template that quant_gemm.cpp also instantiates
// (std::vector<float>, std::fill) gets compiled here with AVX-512 code; the linker keeps one copy of each.
template <typename T>
struct Scratch {
  T* p;
  explicit Scratch(int64_t n) : p(new T[n]) {}
  ~Scratch() { delete[] p; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

constexpr int kRV = 3;             // vectors of 16 rows per row block
constexpr int kTT = 8;             // tokens per micro tile
constexpr int64_t kTokens = 64;    // tokens per pass over a row block's dequantized weights
constexpr int64_t kChunk = 512;    // k per dequantized chunk (48 rows: 48 KiB of bfloat16)

// buf[(p - p0) * rv + v] (32 bfloat16: 16 rows x inputs 2p, 2p + 1) for pairs p of [k0, k0 + kc)
void dequant(const PackedWeight& w, int64_t blk, int rv, int64_t k0, int64_t kc, uint16_t* buf) {
  if (w.bits == 8) {
    const int8_t* q = static_cast<const int8_t*>(w.q);
    for (int64_t p = 0; p < kc / 2; ++p)
      for (int v = 0; v < rv; ++v) {
        const int8_t* src = q + ((blk + v) * (w.k / 2) + k0 / 2 + p) * 32;
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)src)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + 16))));
        _mm512_storeu_si512(buf + (p * rv + v) * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const __m512i nib = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
  for (int64_t c = 0; c < kc / 4; ++c)
    for (int v = 0; v < rv; ++v) {
      const uint8_t* src = q + ((blk + v) * (w.k / 4) + k0 / 4 + c) * 32;
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)src));
      _mm512_storeu_si512(buf + (2 * c * rv + v) * 32, _mm512_ternarylogic_epi32(b, nib, magic, 0xEA));
      _mm512_storeu_si512(buf + ((2 * c + 1) * rv + v) * 32, _mm512_or_si512(_mm512_srli_epi16(b, 4), magic));
    }
}

struct Fold {           // int4: where a micro tile's groups find their scales and input sums
  const float* s;       // s of (block 0 of the tile, its first group); + v * ldv, + g * 16
  const float* zz;
  int64_t ldv;
  const float* xs;      // xs of (token 0 of the tile, its first group); + t * ldxs, + g
  int64_t ldxs;
};

// fin[t][16 v + i] += the tile's pairs [0, pairs) of tokens x[t] (folded per gpairs, see the top)
template <int TT, int RV>
void micro(const uint16_t* x, int64_t ldx, const uint16_t* buf, int64_t pairs, int64_t gpairs,
           const Fold* fold, float* fin, int64_t ldf) {
  for (int64_t g = 0, p0 = 0; p0 < pairs; ++g, p0 += gpairs) {
    __m512 acc[TT][RV];
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_setzero_ps();
    const int64_t p1 = std::min(pairs, p0 + gpairs);
    for (int64_t p = p0; p < p1; ++p) {
      __m512bh wv[RV];
      for (int v = 0; v < RV; ++v) wv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(buf + (p * RV + v) * 32));
      for (int t = 0; t < TT; ++t) {
        int32_t pair;
        std::memcpy(&pair, x + t * ldx + 2 * p, 4);
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], xv, wv[v]);
      }
    }
    if (fold != nullptr) {
      __m512 sv[RV], zv[RV];
      for (int v = 0; v < RV; ++v) {
        sv[v] = _mm512_loadu_ps(fold->s + v * fold->ldv + g * 16);
        zv[v] = _mm512_loadu_ps(fold->zz + v * fold->ldv + g * 16);
      }
      for (int t = 0; t < TT; ++t) {
        const __m512 xs = _mm512_set1_ps(fold->xs[t * fold->ldxs + g]);
        for (int v = 0; v < RV; ++v) {
          float* f = fin + t * ldf + v * 16;
          const __m512 a = _mm512_fnmadd_ps(xs, zv[v], acc[t][v]);
          _mm512_storeu_ps(f, _mm512_fmadd_ps(a, sv[v], _mm512_loadu_ps(f)));
        }
      }
    } else {
      for (int t = 0; t < TT; ++t)
        for (int v = 0; v < RV; ++v) {
          float* f = fin + t * ldf + v * 16;
          _mm512_storeu_ps(f, _mm512_add_ps(acc[t][v], _mm512_loadu_ps(f)));
        }
    }
  }
}

using Micro = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const Fold*, float*, int64_t);

template <int RV, int... TT>
constexpr std::array<Micro, sizeof...(TT)> micros_for(std::integer_sequence<int, TT...>) {
  return {&micro<TT + 1, RV>...};
}
const std::array<Micro, kTT> kMicro[kRV] = {
    micros_for<1>(std::make_integer_sequence<int, kTT>{}),
    micros_for<2>(std::make_integer_sequence<int, kTT>{}),
    micros_for<3>(std::make_integer_sequence<int, kTT>{}),
};

}  // namespace

void linear(const uint16_t* x, const float* xs, int64_t T, const PackedWeight& w, void* y, bool y_bf16) {
  const int64_t N = w.n, K = w.k, blocks = (N + 15) / 16, row_blocks = (blocks + kRV - 1) / kRV;
  const bool int4 = w.bits == 4;
  const int64_t G = int4 ? w.group : K, groups = K / G;
  const int64_t KC = int4 ? G * std::max<int64_t>(1, kChunk / G) : kChunk;
  constexpr int64_t ldf = kRV * 16;
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<uint16_t> buf(std::min(KC, K) / 2 * kRV * 32);
    Scratch<float> fin(kTokens * ldf);
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t blk = rb * kRV;
      const int rv = static_cast<int>(std::min<int64_t>(kRV, blocks - blk));
      for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
        const int64_t tc = std::min(kTokens, T - t0);
        std::memset(fin.p, 0, tc * ldf * sizeof(float));
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0);
          dequant(w, blk, rv, k0, kc, buf.p);
          for (int64_t tt = 0; tt < tc; tt += kTT) {
            const int n = static_cast<int>(std::min<int64_t>(kTT, tc - tt));
            Fold fold{};
            if (int4)
              fold = {w.s + (blk * groups + k0 / G) * 16, w.zz + (blk * groups + k0 / G) * 16, groups * 16,
                      xs + (t0 + tt) * groups + k0 / G, groups};
            kMicro[rv - 1][n - 1](x + (t0 + tt) * K + k0, K, buf.p, kc / 2, int4 ? G / 2 : kc / 2,
                                  int4 ? &fold : nullptr, fin.p + tt * ldf, ldf);
          }
        }
        for (int64_t t = 0; t < tc; ++t)
          for (int v = 0; v < rv; ++v) {
            const int64_t n0 = (blk + v) * 16;
            const __mmask16 m = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - n0)) - 1);
            __m512 val = _mm512_loadu_ps(fin.p + t * ldf + v * 16);
            if (!int4) val = _mm512_mul_ps(val, _mm512_loadu_ps(w.s + n0));
            if (y_bf16)
              _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + (t0 + t) * N + n0, m,
                                       reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(val)));
            else
              _mm512_mask_storeu_ps(static_cast<float*>(y) + (t0 + t) * N + n0, m, val);
          }
      }
    }
  });
}

}  // namespace avx512_bf16
}  // namespace openlora_quant
