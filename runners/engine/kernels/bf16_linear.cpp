// BentoChat's bfloat16 matmul on AVX-512 BF16 (CPUs without AMX, such as AMD Zen 4): y = x W^T + b, with W
// packed by runners/engine/native.py.
//
// Every output element is one running float32 sum over the inner dimension, a pair of elements at a time
// in order (VDPBF16PS), then the bias, then one rounding to bfloat16, whatever the number of rows: a row so
// gets the same bits alone and in a batch of any size. Up to 6 rows and 32 output features share each load
// of the weights, as in f32_linear.cpp.
//
// Packed W: [P][K / 2][16][2] bfloat16 for P panels of 16 output features (zero-padded) and K inner
// elements (an even number: x is padded with a zero where K is odd).
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t LANES = 16, ROWS = 6;

// Rows 0..R-1 of x (pairs of bfloat16 as 32-bit words, `pairs` a row) times P panels (`stride` words apart).
template <int R, int P>
void block(const uint32_t* x, int64_t pairs, const uint32_t* w, int64_t stride, uint16_t* y, int64_t ldy,
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
      _mm256_mask_storeu_epi16(y + r * ldy + p * LANES, mask[p], (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][p], bias)));
  }
}

template <int P>
void panels(const uint32_t* x, int64_t m, int64_t pairs, const uint32_t* w, uint16_t* y, int64_t n, const float* b,
            const __mmask16* mask) {
  const int64_t stride = pairs * LANES;
  int64_t r0 = 0;
  for (; r0 + ROWS <= m; r0 += ROWS) block<ROWS, P>(x + r0 * pairs, pairs, w, stride, y + r0 * n, n, b, mask);
  const uint32_t* xr = x + r0 * pairs;
  uint16_t* yr = y + r0 * n;
  switch (m - r0) {
    case 1: block<1, P>(xr, pairs, w, stride, yr, n, b, mask); break;
    case 2: block<2, P>(xr, pairs, w, stride, yr, n, b, mask); break;
    case 3: block<3, P>(xr, pairs, w, stride, yr, n, b, mask); break;
    case 4: block<4, P>(xr, pairs, w, stride, yr, n, b, mask); break;
    case 5: block<5, P>(xr, pairs, w, stride, yr, n, b, mask); break;
    default: break;
  }
}

}  // namespace

namespace bentochat {

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 4 &&
              w.size(2) == LANES && w.size(3) == 2 && w.is_contiguous());
  const int64_t count = w.size(0), pairs = w.size(1), k = x.size(-1);
  TORCH_CHECK(k <= 2 * pairs && n <= count * LANES, "x or n does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto rows2d = x.reshape({-1, k});
  if (k != 2 * pairs) rows2d = at::constant_pad_nd(rows2d, {0, 2 * pairs - k});
  rows2d = rows2d.contiguous();
  const int64_t m = rows2d.size(0);
  auto y = at::empty({m, n}, x.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n);
    b = bias->data_ptr<float>();
  }
  if (m == 0) return y.view(out_shape);
  const auto* xs = static_cast<const uint32_t*>(rows2d.data_ptr());
  const auto* ws = static_cast<const uint32_t*>(w.data_ptr());
  auto* ys = static_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, (count + 1) / 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; pair++) {
      const int64_t p = 2 * pair, here = std::min<int64_t>(2, count - p);
      __mmask16 mask[2] = {0, 0};
      for (int64_t j = 0; j < here; j++) {
        const int64_t left = n - (p + j) * LANES;
        mask[j] = left >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      }
      const float* bp = b ? b + p * LANES : nullptr;
      if (here == 2) panels<2>(xs, m, pairs, ws + p * pairs * LANES, ys + p * LANES, n, bp, mask);
      else panels<1>(xs, m, pairs, ws + p * pairs * LANES, ys + p * LANES, n, bp, mask);
    }
  });
  return y.view(out_shape);
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("bf16_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::bf16_linear);
}
