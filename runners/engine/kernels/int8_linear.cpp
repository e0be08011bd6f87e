// BentoChat's int8 matmul: y = x W^T + b, x in the model's dtype (bfloat16 or float32), W quantized by
// runners/engine/native.py (pack_int8) to symmetric int8 with one float32 scale per group of 32 inner elements
// of each output feature (as GGUF's Q8_0 blocks: scale = absmax / 127). Decode at batch 1 is bound by reading
// the weights: int8 reads 1.125 bytes a weight (its scales included), bfloat16 2. Two kinds of kernel, the
// weights' layout says which (pack_int8 packs a bfloat16 model's for x quantized where the CPU has AVX-512 VNNI or
// is on the AVX2 level):
//
// On AVX-512 or AVX2, the weights alone in int8 (a float32 model's; simd.h's 16 lanes): every output element is
// summed in the same order whatever the number of rows or threads: per group, a float32 partial sum of x * w over
// its 32 inner elements, in order (the weights converted int8 -> int32 -> float32 in registers, each multiplied by
// the broadcast x); then acc = fma(partial, scale, acc), group after group; then the bias. A row so gets the same
// bits alone and in a batch of any size. Up to 6 rows share each conversion of the weights (2 panels of 16 output
// features), or up to 3 rows 4 panels (more independent sums in flight where there are few rows; which changes no
// row's order); on AVX2 up to 3 rows one panel, or one row 2 panels.
// Packed W (int8), P panels of 16 output features (zero-padded) and G groups of 32 inner elements
// (zero-padded): [P][G][576 bytes], each group 32 x 16 int8 weights (inner element i's 16 features at
// 16 i) then the 16 features' float32 scales.
//
// x quantized alike (a bfloat16 model's, see quantize_row), on AMX (tiles_matmul) where Linux grants its tiles,
// else on AVX-512 VNNI (vnni_block, CPUs without AMX such as AMD Zen 4), else on AVX2 (avx2_block), all with the
// same bits: 1.7x the AVX-512 kernel at 8 rows and 3x at 512 (a prompt's prefill) on AMX on a 2-core Xeon;
// [P][G][16][36], each group's weights in AMX's B tile order (inner quad j's 16 features at 64 j, each feature's 4 elements side by
// side), which is also VPDPBUSD's (one register a quad: 16 lanes of 4 bytes).
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using bentochat::simd::Mask;
using bentochat::simd::Vec;

constexpr int64_t LANES = 16, GROUP = 32, QUAD = 4;
#ifdef __AVX512F__
constexpr int64_t ROWS = 6;  // (and up to 3 rows 4 panels, 2 panels otherwise)
#else
constexpr int64_t ROWS = 3;  // (2 panels for one row, one otherwise: 16 registers)
#endif
constexpr int64_t GROUP_BYTES = GROUP * LANES + LANES * 4;  // 576: the weights, then the scales
constexpr int64_t GROUP4_BYTES = GROUP * LANES / 2 + LANES * 8;  // 384 (int4_linear's): nibbles, scales, offsets

// The first n of 16 lanes (none for n <= 0).
inline Mask lanes(int64_t n) { return bentochat::simd::first(n); }

// The bias as the kernels take it (float32, at least n), or null.
const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n);
  return bias->data_ptr<float>();
}

// Rows 0..R-1 of x (float32, ldx apart, groups * GROUP each) times P panels of w (`stride` bytes apart), into
// y (ldy apart; + b, the panels' bias, where not null), masked to each panel's features.
template <int R, int P>
void block(const float* x, int64_t ldx, int64_t groups, const int8_t* w, int64_t stride, float* y, int64_t ldy,
           const float* b, const Mask* mask) {
  using namespace bentochat::simd;
  Vec acc[R][P];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) acc[r][p] = zero();
  for (int64_t g = 0; g < groups; g++) {
    const int8_t* wg = w + g * GROUP_BYTES;
    const float* xg = x + g * GROUP;
    Vec part[R][P];
#pragma GCC unroll 32
    for (int i = 0; i < GROUP; i++) {
      Vec wf[P];
      for (int p = 0; p < P; p++) wf[p] = widen(wg + p * stride + i * LANES);
      for (int r = 0; r < R; r++) {
        const Vec a = set1(xg[r * ldx + i]);
        for (int p = 0; p < P; p++) part[r][p] = i == 0 ? a * wf[p] : fma(a, wf[p], part[r][p]);
      }
    }
    for (int p = 0; p < P; p++) {
      const Vec scale = load(reinterpret_cast<const float*>(wg + p * stride + GROUP * LANES));
      for (int r = 0; r < R; r++) acc[r][p] = fma(part[r][p], scale, acc[r][p]);
    }
  }
  for (int p = 0; p < P; p++) {
    const Vec bias = b ? load(b + p * LANES, mask[p]) : zero();
    for (int r = 0; r < R; r++) store(y + r * ldy + p * LANES, acc[r][p] + bias, mask[p]);
  }
}

// Panels 0 .. count - 1 (count <= 4) of R rows: all 4 at once for up to WIDE rows (more independent sums in flight
// where there are few rows), else 2 at a time, then one: each(std::integral_constant<int, P>(), first panel).
template <int R, int WIDE, typename Each>
void by_panels(int64_t count, Each&& each) {
  int64_t p = 0;
#ifdef __AVX512F__
  if (R <= WIDE && count == 4) return each(std::integral_constant<int, 4>(), 0);
  for (; p + 2 <= count; p += 2) each(std::integral_constant<int, 2>(), p);
#else  // (AVX2: 2 panels for one row)
  if constexpr (R == 1)
    for (; p + 2 <= count; p += 2) each(std::integral_constant<int, 2>(), p);
#endif
  for (; p < count; p++) each(std::integral_constant<int, 1>(), p);
}

// m rows times `count` panels: quads of panels split over torch's threads, each quad's rows in blocks of ROWS, then
// the rest: run(std::integral_constant<int, R>(), first row, first panel, panels (<= 4), their masks (n features)).
template <typename Run>
void split(int64_t m, int64_t count, int64_t n, Run&& run) {
  at::parallel_for(0, (count + QUAD - 1) / QUAD, 1, [&](int64_t first, int64_t last) {
    for (int64_t quad = first; quad < last; quad++) {
      const int64_t p0 = QUAD * quad, here = std::min<int64_t>(QUAD, count - p0);
      Mask mask[QUAD] = {lanes(0), lanes(0), lanes(0), lanes(0)};
      for (int64_t j = 0; j < here; j++) mask[j] = lanes(n - (p0 + j) * LANES);
      int64_t r0 = 0;
      for (; r0 + ROWS <= m; r0 += ROWS) run(std::integral_constant<int, ROWS>(), r0, p0, here, mask);
      switch (m - r0) {
        case 1: run(std::integral_constant<int, 1>(), r0, p0, here, mask); break;
        case 2: run(std::integral_constant<int, 2>(), r0, p0, here, mask); break;
#ifdef __AVX512F__
        case 3: run(std::integral_constant<int, 3>(), r0, p0, here, mask); break;
        case 4: run(std::integral_constant<int, 4>(), r0, p0, here, mask); break;
        case 5: run(std::integral_constant<int, 5>(), r0, p0, here, mask); break;
#endif
        default: break;
      }
    }
  });
}

// y [m, n] = x [m, groups * GROUP floats] times the `count` panels of w, + b.
void matmul(const float* x, int64_t m, int64_t groups, const int8_t* w, int64_t count, float* y, int64_t n,
            const float* b) {
  const int64_t stride = groups * GROUP_BYTES, ldx = groups * GROUP;
  split(m, count, n, [&](auto rows, int64_t r0, int64_t p0, int64_t here, const Mask* mask) {
    by_panels<decltype(rows)::value, 3>(here, [&](auto panels, int64_t p) {
      const int64_t first = p0 + p;
      block<decltype(rows)::value, decltype(panels)::value>(x + r0 * ldx, ldx, groups, w + first * stride, stride,
                                                              y + r0 * n + first * LANES, n,
                                                              b ? b + first * LANES : nullptr, mask + p);
    });
  });
}

#if defined(BENTOCHAT_VNNI) || defined(BENTOCHAT_AVX2)
#define QUANTIZED_X 1
// ---- x quantized: a bfloat16 model's weights, packed in AMX's B tile order (pack_int8 on AMX, VNNI or AVX2) ----
// x is quantized too, as llama.cpp multiplies Q8_0 weights: each row's 32 inner elements of a group to int8 with
// their own float32 scale (absmax / 127). Per panel and row, group after group: the exact int32 sums of the row's
// group times the group's 32 x 16 weights (an int8 tile multiply on AMX, TDPBSSD; 8 VPDPBUSD on AVX-512 VNNI; on
// AVX2 VPMADDUBSW and VPMADDWD), then acc = fma(sum * x's scale, the weights' scale, acc), in float32. The kernels
// so give the same bits, and a
// row's sums depend on nothing but its own data: it gets the same bits alone and in a batch of any size. They
// are not the AVX-512 kernel's (which keeps x as it is), which the machine and the model's dtype choose, never
// the batch.

// Row r of x (bfloat16, k elements, zero-padded to `groups` groups) as int8 [groups * GROUP], per-group scales,
// per-group sums of x as quantized (scale * the sum of the int8 values; int4_linear's offsets take them) and
// the sums of the int8 values (totals; int8_linear's VNNI kernel takes them).
void quantize_row(const uint16_t* x, int64_t k, int64_t groups, int8_t* q, float* scales, float* sums,
                  int32_t* totals) {
  using namespace bentochat::simd;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t i = g * GROUP;
    const Vec v[2] = {load(x + i, first(k - i)), load(x + i + 16, first(k - i - 16))};
    const float scale = top(max(abs(v[0]), abs(v[1]))) / 127.0f;
    const Vec inverse = set1(scale > 0 ? 1.0f / scale : 0.0f);
    scales[g] = scale;
    totals[g] = to_int8(v[0] * inverse, q + i) + to_int8(v[1] * inverse, q + i + 16);
    sums[g] = scale * static_cast<float>(totals[g]);
  }
}

// x's 4 int8 values at p, in every lane.
#ifdef __AVX512F__
inline __m512i quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
#else
inline __m256i quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
#endif

#ifdef BENTOCHAT_VNNI
// On AVX-512 VNNI: rows 0..R-1 of x quantized (q: ldx bytes apart; xs, xsums, totals: `groups` apart) times P
// panels of w (`stride` bytes apart), into y (ldy apart; + b, the panels' bias, where not null), masked to each
// panel's features. Per group, one int32 sum per row and feature, 4 products a lane (VPDPBUSD, unsigned bytes
// times signed ones): int8 weights made unsigned (+ 128: their sign bit flipped) and the sum started at -128
// times the sum of the row's group, so that it is the products' exact sum (llama.cpp flips signs instead: a few
// more operations per row); 4-bit values are unsigned as they are. Then, as on AMX, the scales (FOUR: and x's sum
// times the weights' offsets), group after group.
template <int R, int P, bool FOUR>
void vnni_block(const int8_t* q, int64_t ldx, const float* xs, const float* xsums, const int32_t* totals,
                int64_t groups, const uint8_t* w, int64_t stride, uint16_t* y, int64_t ldy, const float* b,
                const Mask* mask) {
  constexpr int64_t BYTES = FOUR ? GROUP4_BYTES : GROUP_BYTES, WEIGHTS = FOUR ? GROUP * LANES / 2 : GROUP * LANES;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), low = _mm512_set1_epi8(15);
  __m512 acc[R][P];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* wg = w + g * BYTES;
    const int8_t* xg = q + g * GROUP;
    __m512i sum[R][P];
    for (int r = 0; r < R; r++)
      for (int p = 0; p < P; p++) sum[r][p] = FOUR ? _mm512_setzero_si512() : _mm512_set1_epi32(-128 * totals[r * groups + g]);
    if constexpr (FOUR) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; j++) {  // inner quads j and j + 4: the low and the high nibbles of the same 64 bytes
        __m512i lo[P], hi[P];
        for (int p = 0; p < P; p++) {
          const __m512i v = _mm512_loadu_si512(wg + p * stride + 64 * j);
          lo[p] = _mm512_and_si512(v, low);
          hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int r = 0; r < R; r++) {
          const __m512i a = quad(xg + r * ldx + 4 * j), a4 = quad(xg + r * ldx + 4 * (j + 4));
          for (int p = 0; p < P; p++) sum[r][p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[r][p], lo[p], a), hi[p], a4);
        }
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < GROUP / 4; j++) {
        __m512i u[P];
        for (int p = 0; p < P; p++) u[p] = _mm512_xor_si512(_mm512_loadu_si512(wg + p * stride + 64 * j), flip);
        for (int r = 0; r < R; r++) {
          const __m512i a = quad(xg + r * ldx + 4 * j);
          for (int p = 0; p < P; p++) sum[r][p] = _mm512_dpbusd_epi32(sum[r][p], u[p], a);
        }
      }
    }
    for (int p = 0; p < P; p++) {
      const float* wf = reinterpret_cast<const float*>(wg + p * stride + WEIGHTS);
      const __m512 scale = _mm512_loadu_ps(wf);
      for (int r = 0; r < R; r++) {
        acc[r][p] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum[r][p]), _mm512_set1_ps(xs[r * groups + g])),
                                    scale, acc[r][p]);
        if constexpr (FOUR) acc[r][p] = _mm512_fmadd_ps(_mm512_set1_ps(xsums[r * groups + g]), _mm512_loadu_ps(wf + 16), acc[r][p]);
      }
    }
  }
  for (int p = 0; p < P; p++) {
    const __m512 bias = b ? _mm512_maskz_loadu_ps(mask[p], b + p * LANES) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++)
      _mm256_mask_storeu_epi16(y + r * ldy + p * LANES, mask[p], (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][p], bias)));
  }
}

#else
// On AVX2: as vnni_block, a panel's 16 features in two registers of 8, each VPDPBUSD's products summed by
// VPMADDUBSW (pairs of unsigned bytes times signed ones, into 16 bits, saturated) and VPMADDWD (pairs of those
// into 32 bits): exact while a pair's sum stays within 32,767, so int8 weights go in as their magnitudes (at most
// 128) times x's values with the weights' signs (x's are at most 127: llama.cpp's sign trick, the other way
// round), 4-bit ones (at most 15) as they are. The int32 sums are VNNI's, and so are the bits.
template <int R, int P, bool FOUR>
void avx2_block(const int8_t* q, int64_t ldx, const float* xs, const float* xsums, int64_t groups, const uint8_t* w,
                int64_t stride, uint16_t* y, int64_t ldy, const float* b, const Mask* mask) {
  using namespace bentochat::simd;
  constexpr int64_t BYTES = FOUR ? GROUP4_BYTES : GROUP_BYTES, WEIGHTS = FOUR ? GROUP * LANES / 2 : GROUP * LANES;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  // s += the 4-product sums of u's unsigned bytes times a's signed ones, a lane
  const auto dot = [&](__m256i& s, __m256i u, __m256i a) {
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), ones));
  };
  Vec acc[R][P];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) acc[r][p] = zero();
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* wg = w + g * BYTES;
    const int8_t* xg = q + g * GROUP;
    __m256i sum[R][P][2];
    for (int r = 0; r < R; r++)
      for (int p = 0; p < P; p++) sum[r][p][0] = sum[r][p][1] = _mm256_setzero_si256();
    if constexpr (FOUR) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; j++) {  // inner quads j and j + 4: the low and the high nibbles of the same 64 bytes
        __m256i lo[P][2], hi[P][2];
        for (int p = 0; p < P; p++)
          for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * stride + 64 * j + 32 * h));
            lo[p][h] = _mm256_and_si256(v, low);
            hi[p][h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          }
        for (int r = 0; r < R; r++) {
          const __m256i a = quad(xg + r * ldx + 4 * j), a4 = quad(xg + r * ldx + 4 * (j + 4));
          for (int p = 0; p < P; p++)
            for (int h = 0; h < 2; h++) {
              dot(sum[r][p][h], lo[p][h], a);
              dot(sum[r][p][h], hi[p][h], a4);
            }
        }
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < GROUP / 4; j++) {
        __m256i v[P][2], u[P][2];
        for (int p = 0; p < P; p++)
          for (int h = 0; h < 2; h++) {
            v[p][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * stride + 64 * j + 32 * h));
            u[p][h] = _mm256_abs_epi8(v[p][h]);  // (-128's is 128 as an unsigned byte)
          }
        for (int r = 0; r < R; r++) {
          const __m256i a = quad(xg + r * ldx + 4 * j);
          for (int p = 0; p < P; p++)
            for (int h = 0; h < 2; h++) dot(sum[r][p][h], u[p][h], _mm256_sign_epi8(a, v[p][h]));
        }
      }
    }
    for (int p = 0; p < P; p++) {
      const float* wf = reinterpret_cast<const float*>(wg + p * stride + WEIGHTS);
      const Vec scale = load(wf);
      for (int r = 0; r < R; r++) {
        const Vec s = {_mm256_cvtepi32_ps(sum[r][p][0]), _mm256_cvtepi32_ps(sum[r][p][1])};
        acc[r][p] = fma(s * set1(xs[r * groups + g]), scale, acc[r][p]);
        if constexpr (FOUR) acc[r][p] = fma(set1(xsums[r * groups + g]), load(wf + 16), acc[r][p]);
      }
    }
  }
  for (int p = 0; p < P; p++) {
    const Vec bias = b ? load(b + p * LANES, mask[p]) : zero();
    for (int r = 0; r < R; r++) store(y + r * ldy + p * LANES, acc[r][p] + bias, mask[p]);
  }
}
#endif

// y [m, n] = x (quantized: q [m, groups * GROUP], scales, sums and totals [m, groups]) times the `count` panels of
// w, + b, on AVX-512 VNNI or AVX2. FOUR: w is int4_linear's, else int8_linear's.
template <bool FOUR>
void quantized_matmul(const int8_t* q, const float* xs, const float* xsums, const int32_t* totals, int64_t m,
                      int64_t groups, const uint8_t* w, int64_t count, uint16_t* y, int64_t n, const float* b) {
  const int64_t stride = groups * (FOUR ? GROUP4_BYTES : GROUP_BYTES), ldx = groups * GROUP;
  split(m, count, n, [&](auto rows, int64_t r0, int64_t p0, int64_t here, const Mask* mask) {
    constexpr int R = decltype(rows)::value;
    by_panels<R, FOUR ? 2 : 3>(here, [&](auto panels, int64_t p) {
      const int64_t first = p0 + p, at = r0 * groups;
#ifdef BENTOCHAT_VNNI
      vnni_block<R, decltype(panels)::value, FOUR>(q + r0 * ldx, ldx, xs + at, xsums + at, totals + at, groups,
                                                   w + first * stride, stride, y + r0 * n + first * LANES, n,
                                                   b ? b + first * LANES : nullptr, mask + p);
#else
      (void)totals;
      avx2_block<R, decltype(panels)::value, FOUR>(q + r0 * ldx, ldx, xs + at, xsums + at, groups, w + first * stride,
                                                   stride, y + r0 * n + first * LANES, n,
                                                   b ? b + first * LANES : nullptr, mask + p);
#endif
    });
  });
}
#endif

#ifdef BENTOCHAT_AMX
// y [m, n] = x (quantized: q [blocks * 16 rows of groups * GROUP], scales and sums [m, groups]) times the `count`
// panels of w, + b. FOUR: w is int4_linear's (per group 256 bytes of nibbles, unpacked into a B tile of unsigned
// bytes: TDPBSUD; its offsets times x's sums added), else int8_linear's (its int8 bytes a B tile as they are:
// TDPBSSD).
template <bool FOUR>
void tiles_matmul(const int8_t* q, const float* xs, const float* xsums, int64_t m, int64_t groups, const uint8_t* w,
                  int64_t count, uint16_t* y, int64_t n, const float* b) {
  constexpr int64_t BYTES = FOUR ? GROUP4_BYTES : GROUP_BYTES, WEIGHTS = FOUR ? GROUP * LANES / 2 : GROUP * LANES;
  const int64_t stride = groups * BYTES, ldx = groups * GROUP, blocks = (m + 15) / 16;
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    bentochat::TileConfig config;  // A (x) and C: as many rows as there are, up to 16; B: 8 rows of 4 inner x 16 features
    const uint8_t rows = static_cast<uint8_t>(std::min<int64_t>(16, m));
    for (int t = 0; t < 6; t += 3) {
      config.rows[t] = rows; config.colsb[t] = GROUP;
      config.rows[t + 1] = GROUP / 4; config.colsb[t + 1] = 64;
      config.rows[t + 2] = rows; config.colsb[t + 2] = 64;
    }
    bentochat::load_tile_config(config);
    alignas(64) int32_t part[512];
    alignas(64) uint8_t tile[2][GROUP * LANES];  // (int4: a group's weights unpacked)
    const __m512i low = _mm512_set1_epi8(15);
    // group g's weights as a B tile: in place (int8), or unpacked into tile[i] (int4)
    auto weights = [&](const uint8_t* wg, int i) -> const void* {
      if constexpr (!FOUR) return wg;
      for (int c = 0; c < 256; c += 64) {
        const __m512i v = _mm512_loadu_si512(wg + c);
        _mm512_store_si512(tile[i] + c, _mm512_and_si512(v, low));
        _mm512_store_si512(tile[i] + 256 + c, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      }
      return tile[i];
    };
    for (int64_t p = first; p < last; p++) {
      const uint8_t* wp = w + p * stride;
      const __mmask16 mask = lanes(n - p * LANES);
      const __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b + p * LANES) : _mm512_setzero_ps();
      for (int64_t k = 0; k < blocks; k++) {
        const int64_t here = std::min<int64_t>(16, m - k * 16);
        const float* s = xs + k * 16 * groups;
        const float* t = xsums + k * 16 * groups;
        __m512 acc[16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        // acc += the group's sums (in part) * x's scale * the weights' scale (+ x's sum * the weights' offset)
        auto add = [&](int64_t g, const int32_t* sums) {
          const float* wf = reinterpret_cast<const float*>(wp + g * BYTES + WEIGHTS);
          const __m512 scale = _mm512_loadu_ps(wf);
#pragma GCC unroll 16
          for (int r = 0; r < 16; r++)
            if (r < here) {
              acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + r * 16)),
                                                     _mm512_set1_ps(s[r * groups + g])), scale, acc[r]);
              if constexpr (FOUR) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(t[r * groups + g]), _mm512_loadu_ps(wf + 16), acc[r]);
            }
        };
        // two groups at a time, on tiles of their own (0, 1, 2 and 3, 4, 5), so that one's sums are stored while the
        // other's are multiplied
        for (int64_t g = 0; g < groups; g += 2) {
          const uint8_t* wg = wp + g * BYTES;
          for (int64_t line = 0; line < 2 * BYTES; line += 64)  // groups ahead (the prefetchers miss tile loads)
            _mm_prefetch(reinterpret_cast<const char*>(wg + 4 * BYTES + line), _MM_HINT_T0);
          const int8_t* xg = q + k * 16 * ldx + g * GROUP;
          _tile_loadd(1, weights(wg, 0), 64);
          _tile_loadd(0, xg, ldx);
          _tile_zero(2);
          if constexpr (FOUR) _tile_dpbsud(2, 0, 1); else _tile_dpbssd(2, 0, 1);
          if (g + 1 < groups) {
            _tile_loadd(4, weights(wg + BYTES, 1), 64);
            _tile_loadd(3, xg + GROUP, ldx);
            _tile_zero(5);
            if constexpr (FOUR) _tile_dpbsud(5, 3, 4); else _tile_dpbssd(5, 3, 4);
          }
          _tile_stored(2, part, 64);
          if (g + 1 < groups) _tile_stored(5, part + 256, 64);
          add(g, part);
          if (g + 1 < groups) add(g + 1, part + 256);
        }
        for (int64_t r = 0; r < here; r++)
          _mm256_mask_storeu_epi16(y + (k * 16 + r) * n + p * LANES, mask,
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r], bias)));
      }
    }
    _tile_release();
  });
}

#endif

#ifdef QUANTIZED_X
// int8_linear and int4_linear with x quantized: x (bfloat16 [..., k]) quantized, then times w, on AMX where Linux
// grants its tiles, else on AVX-512 VNNI or AVX2 (the same bits).
template <bool FOUR>
at::Tensor on_quantized(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "int8_linear, int4_linear: weights packed for x quantized take bfloat16");
  const int64_t groups = w.size(1), inner = groups * GROUP, k = x.size(-1);
  TORCH_CHECK(k <= inner, "int8_linear, int4_linear: x does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  const at::Tensor rows = x.reshape({-1, k}).contiguous();
  const int64_t m = rows.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const float* b = bias_of(bias, n);
  if (m == 0) return y.view(out_shape);
  at::Tensor q = at::zeros({(m + 15) / 16 * 16, inner}, x.options().dtype(at::kChar));  // (AMX: whole blocks of rows)
  at::Tensor scales = at::empty({2, m, groups}, x.options().dtype(at::kFloat));  // x's scales, then its sums
  at::Tensor totals = at::empty({m, groups}, x.options().dtype(at::kInt));
  float* xs = scales.data_ptr<float>();
  const auto* xr = static_cast<const uint16_t*>(rows.data_ptr());
  at::parallel_for(0, m, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; r++)
      quantize_row(xr + r * k, k, groups, q.data_ptr<int8_t>() + r * inner, xs + r * groups, xs + (m + r) * groups,
                   totals.data_ptr<int32_t>() + r * groups);
  });
  const auto* ws = static_cast<const uint8_t*>(w.data_ptr());
  auto* ys = static_cast<uint16_t*>(y.data_ptr());
#ifdef BENTOCHAT_AMX
  // AMX's tiles pay off from 8 rows; fewer (a decode step of a few sequences) go faster with VPDPBUSD, which
  // gives the same bits (the 1.7B shape in int8, one sequence: 13.9 against 9.8 tokens/s; 8: 60.8 against 60.1).
  if (m >= 8 && bentochat::amx_available()) {
    tiles_matmul<FOUR>(q.data_ptr<int8_t>(), xs, xs + m * groups, m, groups, ws, w.size(0), ys, n, b);
    return y.view(out_shape);
  }
#endif
  quantized_matmul<FOUR>(q.data_ptr<int8_t>(), xs, xs + m * groups, totals.data_ptr<int32_t>(), m, groups, ws,
                         w.size(0), ys, n, b);
  return y.view(out_shape);
}
#else  // the AVX-512 level without VNNI
template <bool FOUR>
at::Tensor on_quantized(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "int8_linear, int4_linear: weights packed for x quantized, and this library is built without "
                     "AVX-512 VNNI");
}
#endif

}  // namespace

namespace bentochat {

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "int8_linear: x in bfloat16 or float32");
  const bool tiles = w.dim() == 4;  // (packed for x quantized: AMX's tile order)
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 3 + tiles && w.size(2) * (tiles ? w.size(3) : 1) == GROUP_BYTES &&
                  w.is_contiguous() && n <= w.size(0) * LANES,
              "int8_linear: w is not packed by native.pack_int8 for n features");
  if (tiles) return on_quantized<false>(x, w, n, bias);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: bfloat16 x takes weights packed for x quantized (pack_int8 "
                                             "where native.quantized_rows())");
  const int64_t groups = w.size(1), inner = groups * GROUP, k = x.size(-1);
  TORCH_CHECK(k <= inner, "int8_linear: x does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor rows = x.reshape({-1, k});
  if (k != inner) rows = at::constant_pad_nd(rows, {0, inner - k});
  rows = rows.contiguous();
  at::Tensor y = at::empty({rows.size(0), n}, x.options());
  const float* b = bias_of(bias, n);
  const int64_t m = rows.size(0);
  if (m > 0)
    matmul(rows.data_ptr<float>(), m, groups, static_cast<const int8_t*>(w.data_ptr()), w.size(0), y.data_ptr<float>(),
           n, b);
  return y.view(out_shape);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(2) == GROUP4_BYTES &&
                  w.is_contiguous() && n <= w.size(0) * LANES,
              "int4_linear: w is not packed by native.pack_int4 for n features");
  return on_quantized<true>(x, w, n, bias);
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("int8_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::int8_linear);
  m.def("int4_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::int4_linear);
}
