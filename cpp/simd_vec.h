// One vector type per instruction set for the per-ISA kernels (cpu_kernels_<isa>.cpp): Vec holds
// Vec::L fp32 lanes (16 with AVX-512, 8 with AVX2, 4 with SSE2 on generic x86-64, 1 elsewhere) and loads float32 or bfloat16
// (its bits, uint16_t) widened to fp32, whole or the first n < L lanes (the rest read as 0, and n <= 0 reads nothing), and stores
// back rounding to nearest even (bf16 NaN stays a quiet NaN, as c10::BFloat16 rounds). No ATen, no
// c10: everything here is compiled under the including file's flags only.
#pragma once

#ifndef OPENLORA_ISA
#error "define OPENLORA_ISA (the namespace) before including simd_vec.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace openlora {
namespace OPENLORA_ISA {
namespace {

using bf16_bits = uint16_t;

inline float bf16_to_float(bf16_bits b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_bits float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<bf16_bits>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) { return bf16_to_float(v); }
template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline bf16_bits from_float<bf16_bits>(float v) { return float_to_bf16(v); }

#if defined(__AVX512F__)
struct Vec {
  static constexpr int L = 16;
  using R = __m512;
  static __mmask16 mask(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static R widen(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }
  static R load(const bf16_bits* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const bf16_bits* p, int64_t n) { return widen(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static __m256i narrow(R v) {
#if defined(__AVX512BF16__)
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static void store(bf16_bits* p, R v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void store(bf16_bits* p, R v, int64_t n) { _mm256_mask_storeu_epi16(p, mask(n), narrow(v)); }
};
#elif defined(__AVX2__)
struct Vec {
  static constexpr int L = 8;
  using R = __m256;
  static __m256i mask(int64_t n) {
    alignas(32) static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - (n < 0 ? 0 : n < 8 ? n : 8)));
  }
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask(n)); }
  static R widen(__m128i raw) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)); }
  static R load(const bf16_bits* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load(const bf16_bits* p, int64_t n) {
    alignas(16) bf16_bits buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n > 0) std::memcpy(buf, p, static_cast<size_t>(n < 8 ? n : 8) * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static __m128i narrow(R v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit half: 4 values twice
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, mask(n), v); }
  static void store(bf16_bits* p, R v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
  static void store(bf16_bits* p, R v, int64_t n) {
    alignas(16) bf16_bits buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), narrow(v));
    if (n > 0) std::memcpy(p, buf, static_cast<size_t>(n < 8 ? n : 8) * 2);
  }
};
#elif defined(__SSE2__)
struct Vec {  // x86-64's baseline: 4 lanes, multiply then add (no FMA instruction before AVX2)
  static constexpr int L = 4;
  using R = __m128;
  static int64_t lanes(int64_t n) { return n <= 0 ? 0 : n < 4 ? n : 4; }
  static R zero() { return _mm_setzero_ps(); }
  static R set1(float v) { return _mm_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static R add(R a, R b) { return _mm_add_ps(a, b); }
  static float sum(R v) {
    const __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static R load(const float* p) { return _mm_loadu_ps(p); }
  static R load(const float* p, int64_t n) {
    alignas(16) float buf[4] = {0.f, 0.f, 0.f, 0.f};
    std::memcpy(buf, p, static_cast<size_t>(lanes(n)) * 4);
    return _mm_load_ps(buf);
  }
  // 4 bf16 (the low 64 bits) -> fp32: each value becomes the high half of its lane
  static R widen(__m128i raw) { return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), raw)); }
  static R load(const bf16_bits* p) { return widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static R load(const bf16_bits* p, int64_t n) {
    alignas(16) bf16_bits buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(lanes(n)) * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static void store(float* p, R v) { _mm_storeu_ps(p, v); }
  static void store(float* p, R v, int64_t n) {
    alignas(16) float buf[4];
    _mm_store_ps(buf, v);
    std::memcpy(p, buf, static_cast<size_t>(lanes(n)) * 4);
  }
  static void store(bf16_bits* p, R v) { store(p, v, 4); }
  static void store(bf16_bits* p, R v, int64_t n) {
    alignas(16) float buf[4];
    _mm_store_ps(buf, v);
    for (int64_t i = 0; i < lanes(n); ++i) p[i] = float_to_bf16(buf[i]);
  }
};
#else
struct Vec {
  static constexpr int L = 1;
  using R = float;
  static R zero() { return 0.f; }
  static R set1(float v) { return v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static float sum(R v) { return v; }
  static R load(const float* p) { return *p; }
  static R load(const float* p, int64_t n) { return n > 0 ? *p : 0.f; }
  static R load(const bf16_bits* p) { return bf16_to_float(*p); }
  static R load(const bf16_bits* p, int64_t n) { return n > 0 ? bf16_to_float(*p) : 0.f; }
  static void store(float* p, R v) { *p = v; }
  static void store(float* p, R v, int64_t n) { if (n > 0) *p = v; }
  static void store(bf16_bits* p, R v) { *p = float_to_bf16(v); }
  static void store(bf16_bits* p, R v, int64_t n) { if (n > 0) *p = float_to_bf16(v); }
};
#endif

}  // namespace
}  // namespace OPENLORA_ISA
}  // namespace openlora
