// BentoChat's float32 matmul on AVX-512: y = x W^T + b, with W packed by runners/engine/native.py.
//
// Every output element is the sum of its products in the same order whatever the number of rows: two
// running sums, of the even and of the odd positions of the inner dimension, each in order, added at the
// end, then the bias. A row so gets the same bits alone and in a batch of any size. Up to 6 rows and 32
// output features share each load of the weights (24 sums in registers); one row is bound by reading
// the weights, as on every kernel (on 2 cores: 16.9 ms for SmolLM2's step against 23.6 ms for oneDNN's
// packed float32, and 43.0 against 45.0 at 32 rows; README, Performance).
//
// Packed W: [P][K][16] float32 for P panels of 16 output features (zero-padded) and K inner elements.
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t LANES = 16, ROWS = 6;

// Rows 0..R-1 of x times P panels (`stride` floats apart), into y (with b, the panels' bias, or none).
template <int R, int P>
void block(const float* x, int64_t k, const float* w, int64_t stride, float* y, int64_t ldy, const float* b,
           const __mmask16* mask) {
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

// Every row of x times P panels: blocks of ROWS rows, then the rest.
template <int P>
void panels(const float* x, int64_t m, int64_t k, const float* w, float* y, int64_t n, const float* b,
            const __mmask16* mask) {
  const int64_t stride = k * LANES;
  int64_t r0 = 0;
  for (; r0 + ROWS <= m; r0 += ROWS) block<ROWS, P>(x + r0 * k, k, w, stride, y + r0 * n, n, b, mask);
  const float* xr = x + r0 * k;
  float* yr = y + r0 * n;
  switch (m - r0) {
    case 1: block<1, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 2: block<2, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 3: block<3, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 4: block<4, P>(xr, k, w, stride, yr, n, b, mask); break;
    case 5: block<5, P>(xr, k, w, stride, yr, n, b, mask); break;
    default: break;
  }
}

}  // namespace

namespace bentochat {

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == LANES &&
              w.is_contiguous());
  const int64_t count = w.size(0), k = w.size(1);
  TORCH_CHECK(x.size(-1) == k && n <= count * LANES, "x or n does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  const auto rows2d = x.reshape({-1, k}).contiguous();
  const int64_t m = rows2d.size(0);
  auto y = at::empty({m, n}, x.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n);
    b = bias->data_ptr<float>();
  }
  if (m == 0) return y.view(out_shape);
  const float* xs = rows2d.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, (count + 1) / 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; pair++) {
      const int64_t p = 2 * pair, here = std::min<int64_t>(2, count - p);
      __mmask16 mask[2] = {0, 0};
      for (int64_t j = 0; j < here; j++) {
        const int64_t left = n - (p + j) * LANES;
        mask[j] = left >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      }
      const float* bp = b ? b + p * LANES : nullptr;
      if (here == 2) panels<2>(xs, m, k, ws + p * k * LANES, ys + p * LANES, n, bp, mask);
      else panels<1>(xs, m, k, ws + p * k * LANES, ys + p * LANES, n, bp, mask);
    }
  });
  return y.view(out_shape);
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("f32_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::f32_linear);
}
