// BentoChat's matmuls on AVX-512: y = x W^T + b, with W packed by runners/engine/native.py, in float32
// (f32_linear) and in bfloat16 on AVX-512 BF16 (bf16_linear, for CPUs without AMX, such as AMD Zen 4).
//
// Every output element is summed over the inner dimension in the same order whatever the number of rows,
// then the bias is added: in float32 two running sums, of the even and of the odd inner positions, added at
// the end; in bfloat16 one running float32 sum, a pair of inner elements at a time (VDPBF16PS), rounded to
// bfloat16 at the end. A row so gets the same bits alone and in a batch of any size. Up to 6 rows and 32
// output features share each load of the weights (24 sums in registers); one row is bound by reading the
// weights (README, Performance).
//
// Packed W, P panels of 16 output features (zero-padded) and K inner elements: float32 [P][K][16];
// bfloat16 [P][K / 2][16][2] (x is padded with a zero where K is odd).
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t LANES = 16, ROWS = 6;

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
#ifndef BENTOCHAT_BF16
  TORCH_CHECK(false, "bf16_linear: this library is built without AVX-512 BF16");
#else
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 4 &&
              w.size(2) == LANES && w.size(3) == 2 && w.is_contiguous() && n <= w.size(0) * LANES);
  Operands o(x, 2 * w.size(1), n, bias);
  matmul<BF16>(static_cast<const uint32_t*>(o.rows.data_ptr()), o.rows.size(0), w.size(1),
               static_cast<const uint32_t*>(w.data_ptr()), w.size(0), static_cast<uint16_t*>(o.y.data_ptr()), n,
               o.bias);
  return o.y.view(o.out_shape);
#endif
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("f32_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::f32_linear);
  m.def("bf16_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::bf16_linear);
}
