// 16 float32 lanes for forward.cpp's work between the matmuls (and int8_linear.cpp's), on the library's level:
// one AVX-512 register (each function one instruction, as forward.cpp wrote them before), or two AVX2 registers
// on the AVX2 level, whose loads and stores of fewer than 16 lanes go through a buffer and whose bfloat16 is rounded in
// software (to nearest even, as c10::BFloat16 rounds). A mask is the lanes a load or store touches: the first
// n of 16 (first(n)).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace bentochat::simd {

using bf16 = uint16_t;

#ifdef __AVX512F__
struct Vec {
  __m512 v;
};
using Mask = __mmask16;
inline Mask first(int64_t n) { return n >= 16 ? static_cast<Mask>(0xFFFF) : n <= 0 ? Mask{0} : static_cast<Mask>((1u << n) - 1); }
inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }   // a b + c
inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
inline Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec scale2(Vec y, Vec n) { return {_mm512_scalef_ps(y.v, n.v)}; }  // y 2^n, n integral
inline float sum(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float top(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m, p)}; }
inline Vec keep(Vec a, Mask m) { return {_mm512_maskz_mov_ps(m, a.v)}; }  // zeros outside m
// the lanes of m of b, the others a's
inline Vec blend(Vec a, Vec b, Mask m) { return {_mm512_mask_mov_ps(a.v, m, b.v)}; }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v.v); }
inline void store(float* p, Vec v, Mask m) { _mm512_mask_storeu_ps(p, m, v.v); }
inline Vec widen(__m256i v) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))}; }
inline Vec load(const bf16* p, Mask m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
inline Vec load(const bf16* p) { return load(p, first(16)); }
inline Vec widen(const int8_t* p) {  // 16 int8 as float32
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// v rounded to the nearest integers, clamped to -127 .. 127, stored as 16 int8 at q; returns their sum
inline int32_t to_int8(Vec v, int8_t* q) {
  const __m512i values = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(v.v), _mm512_set1_epi32(127)),
                                          _mm512_set1_epi32(-127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(values));
  return _mm512_reduce_add_epi32(values);
}
#ifdef __AVX512BF16__
inline __m256i narrow(Vec v) { return (__m256i)_mm512_cvtneps_pbh(v.v); }
inline void store(bf16* p, Vec v, Mask m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
inline Vec rounded_bf16(Vec v) { return widen(narrow(v)); }
#else  // (the AVX-512 level runs float32 models only: declared for forward.cpp's templates, never called)
Vec rounded_bf16(Vec v);
#endif
#else  // AVX2 and FMA: lanes 0-7 in lo, 8-15 in hi
struct Vec {
  __m256 lo, hi;
};
struct Mask {
  int n;
};
inline Mask first(int64_t n) { return {static_cast<int>(std::clamp<int64_t>(n, 0, 16))}; }
inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline Vec abs(Vec a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
inline Vec round(Vec a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// y 2^n for integral n in -150 .. 128 (exp's range): two exact powers of two, so that a subnormal result is
// rounded once, as SCALEF rounds it
inline __m256 scale2(__m256 y, __m256 n) {
  const __m256i e = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(e, 1);
  const auto power = [](__m256i k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(y, power(half)), power(_mm256_sub_epi32(e, half)));
}
inline Vec scale2(Vec y, Vec n) { return {scale2(y.lo, n.lo), scale2(y.hi, n.hi)}; }
inline float sum(Vec a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline float top(Vec a) {
  const __m256 s = _mm256_max_ps(a.lo, a.hi);
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
inline Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Vec load(const float* p, Mask m) {
  if (m.n == 16) return load(p);
  alignas(32) float buffer[16] = {};
  std::memcpy(buffer, p, m.n * sizeof(float));
  return load(buffer);
}
inline __m256 lanes_below(int n, int offset) {  // all ones in lanes offset + i < n
  const __m256i i = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(offset));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), i));
}
inline Vec keep(Vec a, Mask m) { return {_mm256_and_ps(a.lo, lanes_below(m.n, 0)), _mm256_and_ps(a.hi, lanes_below(m.n, 8))}; }
inline Vec blend(Vec a, Vec b, Mask m) {
  return {_mm256_blendv_ps(a.lo, b.lo, lanes_below(m.n, 0)), _mm256_blendv_ps(a.hi, b.hi, lanes_below(m.n, 8))};
}
inline void store(float* p, Vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline void store(float* p, Vec v, Mask m) {
  if (m.n == 16) return store(p, v);
  alignas(32) float buffer[16];
  store(buffer, v);
  std::memcpy(p, buffer, m.n * sizeof(float));
}
inline __m256 widen(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
inline Vec load(const bf16* p) {
  return {widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline Vec load(const bf16* p, Mask m) {
  if (m.n == 16) return load(p);
  alignas(32) bf16 buffer[16] = {};
  std::memcpy(buffer, p, m.n * sizeof(bf16));
  return load(buffer);
}
inline Vec widen(const int8_t* p) {  // 16 int8 as float32
  const auto eight = [](const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
  };
  return {eight(p), eight(p + 8)};
}
// as the AVX-512 level's
inline int32_t to_int8(Vec v, int8_t* q) {
  const auto eight = [](__m256 f) {
    return _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
  };
  const __m256i lo = eight(v.lo), hi = eight(v.hi);
  // 16 int8 in order (the packs work within 128-bit halves)
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
  const __m256i total = _mm256_add_epi32(lo, hi);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
// 8 floats as bfloat16 in 32-bit lanes (the high halves zero), rounded to nearest even; NaN stays NaN
inline __m256i narrow32(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(up, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline __m256i narrow(Vec v) {  // 16 bfloat16, in order
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(narrow32(v.lo), narrow32(v.hi)), 0xD8);
}
inline void store(bf16* p, Vec v, Mask m) {
  alignas(32) bf16 buffer[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(m.n == 16 ? p : buffer), narrow(v));
  if (m.n < 16) std::memcpy(p, buffer, m.n * sizeof(bf16));
}
inline Vec rounded_bf16(Vec v) {
  const auto back = [](__m256i b) { return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)); };
  return {back(narrow32(v.lo)), back(narrow32(v.hi))};
}
#endif

}  // namespace bentochat::simd
