// BentoChat's matmuls on AVX-512 and on AVX2: y = x W^T + b, with W packed by runners/engine/native.py, in
// float32 (f32_linear) and in bfloat16 (bf16_linear) on AVX-512 BF16 (CPUs without AMX, such as AMD Zen 4) or on
// AVX2 and FMA (bfloat16 widened to float32 in registers: AMD Zen 2 and 3, Intel before Skylake-SP).
//
// Every output element is summed over the inner dimension in the same order whatever the number of rows,
// then the bias is added. On AVX-512: in float32 two running sums, of the even and of the odd inner
// positions, added at the end; in bfloat16 one running float32 sum, a pair of inner elements at a time
// (VDPBF16PS), rounded to bfloat16 at the end. Up to 6 rows and 32 output features share each load of the
// weights (24 sums in registers). On AVX2: one running float32 sum (an FMA per inner element, in order), up
// to 6 rows in float32 (4 in bfloat16, whose pair of inner elements takes 4 registers of weights) and 16
// output features sharing each load (or 2 rows and 32, more sums in flight where there are few rows; which
// changes no element's order; up to 48 rows, a decode step's, take each panel 8 KB at a time, the sums
// kept in float32 in between, which changes none either). A row so gets the same bits alone and in a batch of
// any size.
// One row is bound by reading the weights (README, Performance).
//
// Packed W, P panels of 16 output features (zero-padded) and K inner elements: float32 [P][K][16];
// bfloat16 [P][K / 2][16][2] (x is padded with a zero where K is odd).
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t LANES = 16;

#ifdef __AVX512F__
constexpr int64_t ROWS = 6;

// float32: x and W in floats, a step of one inner element.
struct F32 {
  using X = float;
  using Y = float;

  // Rows 0..R-1 of x (k floats a row) times P panels (`stride` floats apart), into y (+ b, the panels' bias).
  template <int R, int P>
  static void block(const float* x, int64_t k, const float* w, int64_t stride, float* y, int64_t ldy,
                    const float* b, const __mmask16* mask) {
    __m512 even[R][P], odd[R][P];
    for (int r = 0; r < R; r++)
      for (int p = 0; p < P; p++) even[r][p] = odd[r][p] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < k; i += 2) {
      __m512 w0[P], w1[P];
      for (int p = 0; p < P; p++) {
        w0[p] = _mm512_load_ps(w + p * stride + i * LANES);
        w1[p] = _mm512_load_ps(w + p * stride + (i + 1) * LANES);
      }
      for (int r = 0; r < R; r++) {
        const __m512 a0 = _mm512_set1_ps(x[r * k + i]), a1 = _mm512_set1_ps(x[r * k + i + 1]);
        for (int p = 0; p < P; p++) {
          even[r][p] = _mm512_fmadd_ps(a0, w0[p], even[r][p]);
          odd[r][p] = _mm512_fmadd_ps(a1, w1[p], odd[r][p]);
        }
      }
    }
    if (i < k)
      for (int p = 0; p < P; p++) {
        const __m512 w0 = _mm512_load_ps(w + p * stride + i * LANES);
        for (int r = 0; r < R; r++) even[r][p] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), w0, even[r][p]);
      }
    for (int p = 0; p < P; p++) {
      const __m512 bias = b ? _mm512_maskz_loadu_ps(mask[p], b + p * LANES) : _mm512_setzero_ps();
      for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(y + r * ldy + p * LANES, mask[p], _mm512_add_ps(_mm512_add_ps(even[r][p], odd[r][p]), bias));
    }
  }
};

#ifdef BENTOCHAT_BF16
// bfloat16: x and W in pairs of bfloat16 (32-bit words), a step of one pair.
struct BF16 {
  using X = uint32_t;
  using Y = uint16_t;

  template <int R, int P>
  static void block(const uint32_t* x, int64_t pairs, const uint32_t* w, int64_t stride, uint16_t* y, int64_t ldy,
                    const float* b, const __mmask16* mask) {
    __m512 acc[R][P];
    for (int r = 0; r < R; r++)
      for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; i++) {
      __m512i wi[P];
      for (int p = 0; p < P; p++) wi[p] = _mm512_load_si512(w + p * stride + i * LANES);
      for (int r = 0; r < R; r++) {
        const __m512i a = _mm512_set1_epi32(static_cast<int>(x[r * pairs + i]));
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)a, (__m512bh)wi[p]);
      }
    }
    for (int p = 0; p < P; p++) {
      const __m512 bias = b ? _mm512_maskz_loadu_ps(mask[p], b + p * LANES) : _mm512_setzero_ps();
      for (int r = 0; r < R; r++)
        _mm256_mask_storeu_epi16(y + r * ldy + p * LANES, mask[p],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][p], bias)));
    }
  }
};
#endif

// Every row of x (k steps a row) times P panels of w: blocks of ROWS rows, then the rest.
template <typename K, int P>
void panels(const typename K::X* x, int64_t m, int64_t k, const typename K::X* w, typename K::Y* y, int64_t n,
            const float* b, const __mmask16* mask) {
  const int64_t stride = k * LANES;
  int64_t r0 = 0;
  for (; r0 + ROWS <= m; r0 += ROWS) K::template block<ROWS, P>(x + r0 * k, k, w, stride, y + r0 * n, n, b, mask);
  const auto* xr = x + r0 * k;
  auto* yr = y + r0 * n;
  switch (m - r0) {
    case 1: K::template block<1, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 2: K::template block<2, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 3: K::template block<3, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 4: K::template block<4, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 5: K::template block<5, P>(xr, k, w, stride, yr, n, b, mask); break;
    default: break;
  }
}

// y [m, n] = x [m, k steps] times the `count` panels of w, + b: pairs of panels split over torch's threads.
template <typename K>
void matmul(const typename K::X* x, int64_t m, int64_t k, const typename K::X* w, int64_t count, typename K::Y* y,
            int64_t n, const float* b) {
  at::parallel_for(0, (count + 1) / 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; pair++) {
      const int64_t p = 2 * pair, here = std::min<int64_t>(2, count - p);
      __mmask16 mask[2] = {0, 0};
      for (int64_t j = 0; j < here; j++) {
        const int64_t left = n - (p + j) * LANES;
        mask[j] = left >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      }
      const float* bp = b ? b + p * LANES : nullptr;
      if (here == 2) panels<K, 2>(x, m, k, w + p * k * LANES, y + p * LANES, n, bp, mask);
      else panels<K, 1>(x, m, k, w + p * k * LANES, y + p * LANES, n, bp, mask);
    }
  });
}

#else  // AVX2 and FMA
using bentochat::simd::Vec;

// Where all rows fit one group (a decode step's), the row blocks take a panel chunk by chunk of CHUNK steps (8 KB),
// which stays in L1 while every block uses it; and each block fetches the chunk after next ahead of its loads, so
// that reading the weights from memory and computing on them overlap. Longer batches (prefill), which read the
// panels again and again from L2, take the whole inner dimension at once and fetch nothing ahead (it cost them time).
constexpr int64_t CHUNK = 128, GROUP = 48;

// Steps [from, to) of the inner dimension (a step: K::PER inner elements, 64 bytes of a panel), and whether
// they are the first and the last: the sums in between wait in a scratch of float32, which changes no bit.
struct Span {
  int64_t from, to;
  bool first, last;
};

// Rows 0..R-1 of x (float32, k inner elements a row) times P panels (`stride` elements apart) of K's weights
// over the span's steps: the sums from (and into) part ([row][2 panels][16] floats), or, after the last step,
// into y (+ b, the panels' bias), the panels' first valid[p] output features. K::step(w, lo, hi): the 16
// weights of each inner element of a step as float32.
template <typename K, int R, int P, bool AHEAD>
void block(const float* x, int64_t k, Span span, const typename K::W* w, int64_t stride, float* part,
           typename K::Y* y, int64_t ldy, const float* b, const int64_t* valid) {
  __m256 acc[R][P][2];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++)
      for (int h = 0; h < 2; h++)
        acc[r][p][h] = span.first ? _mm256_setzero_ps() : _mm256_load_ps(part + (r * 2 + p) * LANES + h * 8);
  for (int64_t i = span.from; i < span.to; i++)
    for (int p = 0; p < P; p++) {
      __m256 lo[K::PER], hi[K::PER];
      if constexpr (AHEAD) _mm_prefetch(reinterpret_cast<const char*>(w + p * stride + (i + 2 * CHUNK) * LANES), _MM_HINT_T0);
      K::step(w + p * stride + i * LANES, lo, hi);
      for (int e = 0; e < K::PER; e++)
        for (int r = 0; r < R; r++) {
          const __m256 a = _mm256_set1_ps(x[r * k + i * K::PER + e]);
          acc[r][p][0] = _mm256_fmadd_ps(a, lo[e], acc[r][p][0]);
          acc[r][p][1] = _mm256_fmadd_ps(a, hi[e], acc[r][p][1]);
        }
    }
  if (!span.last) {
    for (int r = 0; r < R; r++)
      for (int p = 0; p < P; p++)
        for (int h = 0; h < 2; h++) _mm256_store_ps(part + (r * 2 + p) * LANES + h * 8, acc[r][p][h]);
    return;
  }
  // (the sums leave their registers once: indexed in the loop below, acc itself would live in memory, and GCC
  // stored it every step above, at a third of the speed)
  Vec sums[R][P];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) sums[r][p] = Vec{acc[r][p][0], acc[r][p][1]};
  for (int p = 0; p < P; p++) {
    const auto m = bentochat::simd::first(valid[p]);
    const Vec bias = b ? bentochat::simd::load(b + p * LANES, m) : bentochat::simd::zero();
    for (int r = 0; r < R; r++) bentochat::simd::store(y + r * ldy + p * LANES, sums[r][p] + bias, m);
  }
}

// float32: a step of one inner element, [16] floats.
struct F32 {
  using W = float;
  using Y = float;
  static constexpr int PER = 1;
  static constexpr int64_t ROWS = 6;  // (12 sums, 2 weights and a broadcast: 15 of the 16 registers)
  static void step(const float* w, __m256* lo, __m256* hi) {
    lo[0] = _mm256_load_ps(w);
    hi[0] = _mm256_load_ps(w + 8);
  }
};

// bfloat16: a step of a pair of inner elements, [16][2] bfloat16 (16 32-bit words), each widened to float32.
struct BF16 {
  using W = uint32_t;
  using Y = uint16_t;
  static constexpr int PER = 2;
  static constexpr int64_t ROWS = 4;  // (8 sums and 4 weights, a pair of inner elements)
  static void step(const uint32_t* w, __m256* lo, __m256* hi) {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + 8));
    lo[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    lo[1] = _mm256_castsi256_ps(_mm256_and_si256(a, high));
    hi[0] = _mm256_castsi256_ps(_mm256_slli_epi32(c, 16));
    hi[1] = _mm256_castsi256_ps(_mm256_and_si256(c, high));
  }
};

// Rows 0..rows-1 (fewer than 6) of x times P panels: block<K, rows, P, AHEAD>.
template <typename K, int P, bool AHEAD>
void rest_block(int64_t rows, const float* x, int64_t k, Span span, const typename K::W* w, int64_t stride,
                float* part, typename K::Y* y, int64_t ldy, const float* b, const int64_t* valid) {
  switch (rows) {
    case 1: return block<K, 1, P, AHEAD>(x, k, span, w, stride, part, y, ldy, b, valid);
    case 2: return block<K, 2, P, AHEAD>(x, k, span, w, stride, part, y, ldy, b, valid);
    case 3: return block<K, 3, P, AHEAD>(x, k, span, w, stride, part, y, ldy, b, valid);
    case 4: return block<K, 4, P, AHEAD>(x, k, span, w, stride, part, y, ldy, b, valid);
    default: return block<K, 5, P, AHEAD>(x, k, span, w, stride, part, y, ldy, b, valid);
  }
}

// y [m, n] = x [m, k] (float32) times the `count` panels of w, + b: pairs of panels split over torch's
// threads; span by span (the whole of k where m > GROUP): blocks of K::ROWS rows one panel at a time, then the
// rest (up to 2 rows both panels at once).
template <typename K>
void matmul(const float* x, int64_t m, int64_t k, const typename K::W* w, int64_t count, typename K::Y* y, int64_t n,
            const float* b) {
  const int64_t steps = k / K::PER, stride = steps * LANES, chunk = m <= GROUP ? CHUNK : steps;
  const int64_t whole = m - m % K::ROWS, rest = m - whole;
  at::parallel_for(0, (count + 1) / 2, 1, [&](int64_t first, int64_t last) {
    alignas(32) float part[GROUP * 2 * LANES];  // (the sums between spans: [row][2 panels][16])
    for (int64_t pair = first; pair < last; pair++) {
      const int64_t p = 2 * pair, here = std::min<int64_t>(2, count - p);
      const int64_t valid[2] = {std::min<int64_t>(LANES, n - p * LANES), std::min<int64_t>(LANES, n - (p + 1) * LANES)};
      const auto* wp = w + p * stride;
      const float* bp = b ? b + p * LANES : nullptr;
      const auto spans = [&](auto ahead) {  // (ahead: whether the blocks fetch the chunk after next)
        constexpr bool A = decltype(ahead)::value;
        for (int64_t from = 0; from < steps; from += chunk) {
          const Span span{from, std::min(steps, from + chunk), from == 0, from + chunk >= steps};
          for (int64_t r0 = 0; r0 < whole; r0 += K::ROWS)
            for (int64_t j = 0; j < here; j++)
              block<K, K::ROWS, 1, A>(x + r0 * k, k, span, wp + j * stride, stride, part + (r0 * 2 + j) * LANES,
                                      y + r0 * n + (p + j) * LANES, n, bp ? bp + j * LANES : nullptr, valid + j);
          const float* xr = x + whole * k;
          float* pr = part + whole * 2 * LANES;
          auto* yr = y + whole * n + p * LANES;
          if (rest > 0 && rest <= 2 && here == 2) {
            rest_block<K, 2, A>(rest, xr, k, span, wp, stride, pr, yr, n, bp, valid);
            continue;
          }
          for (int64_t j = 0; j < here && rest > 0; j++)
            rest_block<K, 1, A>(rest, xr, k, span, wp + j * stride, stride, pr + j * LANES, yr + j * LANES, n,
                                bp ? bp + j * LANES : nullptr, valid + j);
        }
      };
      if (chunk < steps) spans(std::true_type{});
      else spans(std::false_type{});
    }
  });
}
#endif

// x as [rows, inner] (padded with zeros to `inner`), y [rows, n] of x's dtype, and the bias.
struct Operands {
  at::Tensor rows, y;
  const float* bias = nullptr;
  std::vector<int64_t> out_shape;

  Operands(const at::Tensor& x, int64_t inner, int64_t n, const c10::optional<at::Tensor>& b) {
    const int64_t k = x.size(-1);
    TORCH_CHECK(k <= inner, "x does not fit the packed weight");
    out_shape = x.sizes().vec();
    out_shape.back() = n;
    rows = x.reshape({-1, k});
    if (k != inner) rows = at::constant_pad_nd(rows, {0, inner - k});
    rows = rows.contiguous();
    y = at::empty({rows.size(0), n}, x.options());
    if (b.has_value()) {
      TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() >= n);
      bias = b->data_ptr<float>();
    }
  }
};

}  // namespace

namespace bentochat {

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == LANES &&
              w.is_contiguous() && x.size(-1) == w.size(1) && n <= w.size(0) * LANES);
  Operands o(x, w.size(1), n, bias);
  matmul<F32>(o.rows.data_ptr<float>(), o.rows.size(0), w.size(1), w.data_ptr<float>(), w.size(0),
              o.y.data_ptr<float>(), n, o.bias);
  return o.y.view(o.out_shape);
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
#if !defined(BENTOCHAT_BF16) && defined(__AVX512F__)
  TORCH_CHECK(false, "bf16_linear: this library is built without AVX-512 BF16");
#else
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 4 &&
              w.size(2) == LANES && w.size(3) == 2 && w.is_contiguous() && n <= w.size(0) * LANES);
  Operands o(x, 2 * w.size(1), n, bias);
#ifdef __AVX512F__
  matmul<BF16>(static_cast<const uint32_t*>(o.rows.data_ptr()), o.rows.size(0), w.size(1),
               static_cast<const uint32_t*>(w.data_ptr()), w.size(0), static_cast<uint16_t*>(o.y.data_ptr()), n,
               o.bias);
#else  // x widened to float32 once; k counts inner elements
  const at::Tensor wide = o.rows.to(at::kFloat);
  matmul<BF16>(wide.data_ptr<float>(), o.rows.size(0), 2 * w.size(1), static_cast<const uint32_t*>(w.data_ptr()),
               w.size(0), static_cast<uint16_t*>(o.y.data_ptr()), n, o.bias);
#endif
  return o.y.view(o.out_shape);
#endif
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("f32_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::f32_linear);
  m.def("bf16_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::bf16_linear);
}
