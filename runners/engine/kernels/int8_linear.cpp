// BentoChat's weight-only int8 matmul on AVX-512: y = x W^T + b, x in the model's dtype (bfloat16 or
// float32), W quantized by runners/engine/native.py (pack_int8) to symmetric int8 with one float32 scale per
// group of 32 inner elements of each output feature (as GGUF's Q8_0 blocks: scale = absmax / 127). Decode at
// batch 1 is bound by reading the weights: int8 reads 1.125 bytes a weight (its scales included), bfloat16 2.
//
// Every output element is summed in the same order whatever the number of rows or threads: per group, a
// float32 partial sum of x * w over its 32 inner elements, in order (the weights converted int8 -> int32 ->
// float32 in registers, each multiplied by the broadcast x); then acc = fma(partial, scale, acc), group after
// group; then the bias; then rounded to x's dtype. A row so gets the same bits alone and in a batch of any size.
// Up to 6 rows share each conversion of the weights (2 panels of 16 output features), or up to 3 rows 4
// panels (more independent sums in flight where there are few rows; which changes no row's order).
//
// Packed W (int8), P panels of 16 output features (zero-padded) and G groups of 32 inner elements
// (zero-padded): [P][G][576 bytes], each group 32 x 16 int8 weights (inner element i's 16 features at
// 16 i) then the 16 features' float32 scales.
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <type_traits>

namespace {

constexpr int64_t LANES = 16, GROUP = 32, ROWS = 6, QUAD = 4;
constexpr int64_t GROUP_BYTES = GROUP * LANES + LANES * 4;  // 576: the weights, then the scales

// Rows 0..R-1 of x (float32, ldx apart, groups * GROUP each) times P panels of w (`stride` bytes apart), into
// y (ldy apart; + b, the panels' bias, where not null), masked to each panel's features.
template <int R, int P, typename Y>
void block(const float* x, int64_t ldx, int64_t groups, const int8_t* w, int64_t stride, Y* y, int64_t ldy,
           const float* b, const __mmask16* mask) {
  __m512 acc[R][P];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    const int8_t* wg = w + g * GROUP_BYTES;
    const float* xg = x + g * GROUP;
    __m512 part[R][P];
#pragma GCC unroll 32
    for (int i = 0; i < GROUP; i++) {
      __m512 wf[P];
      for (int p = 0; p < P; p++)
        wf[p] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + p * stride + i * LANES))));
      for (int r = 0; r < R; r++) {
        const __m512 a = _mm512_set1_ps(xg[r * ldx + i]);
        for (int p = 0; p < P; p++)
          part[r][p] = i == 0 ? _mm512_mul_ps(a, wf[p]) : _mm512_fmadd_ps(a, wf[p], part[r][p]);
      }
    }
    for (int p = 0; p < P; p++) {
      const __m512 scale = _mm512_loadu_ps(reinterpret_cast<const float*>(wg + p * stride + GROUP * LANES));
      for (int r = 0; r < R; r++) acc[r][p] = _mm512_fmadd_ps(part[r][p], scale, acc[r][p]);
    }
  }
  for (int p = 0; p < P; p++) {
    const __m512 bias = b ? _mm512_maskz_loadu_ps(mask[p], b + p * LANES) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
      const __m512 v = _mm512_add_ps(acc[r][p], bias);
      if constexpr (std::is_same_v<Y, float>) _mm512_mask_storeu_ps(y + r * ldy + p * LANES, mask[p], v);
      else _mm256_mask_storeu_epi16(y + r * ldy + p * LANES, mask[p], (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// R rows times `count` (<= 4) panels: 4 panels at once for up to 3 rows, else 2 at a time.
template <int R, typename Y>
void rows(const float* x, int64_t ldx, int64_t groups, const int8_t* w, int64_t stride, int64_t count, Y* y,
          int64_t ldy, const float* b, const __mmask16* mask) {
  int64_t p = 0;
  if (R <= 3 && count == 4) {
    block<R, 4>(x, ldx, groups, w, stride, y, ldy, b, mask);
    return;
  }
  for (; p + 2 <= count; p += 2)
    block<R, 2>(x, ldx, groups, w + p * stride, stride, y + p * LANES, ldy, b ? b + p * LANES : nullptr, mask + p);
  if (p < count)
    block<R, 1>(x, ldx, groups, w + p * stride, stride, y + p * LANES, ldy, b ? b + p * LANES : nullptr, mask + p);
}

// y [m, n] = x [m, groups * GROUP floats] times the `count` panels of w, + b: quads of panels split over
// torch's threads, each quad's rows in blocks of ROWS, then the rest.
template <typename Y>
void matmul(const float* x, int64_t m, int64_t groups, const int8_t* w, int64_t count, Y* y, int64_t n,
            const float* b) {
  const int64_t stride = groups * GROUP_BYTES, ldx = groups * GROUP;
  at::parallel_for(0, (count + QUAD - 1) / QUAD, 1, [&](int64_t first, int64_t last) {
    for (int64_t quad = first; quad < last; quad++) {
      const int64_t p0 = QUAD * quad, here = std::min<int64_t>(QUAD, count - p0);
      __mmask16 mask[QUAD] = {0, 0, 0, 0};
      for (int64_t j = 0; j < here; j++) {
        const int64_t left = n - (p0 + j) * LANES;
        mask[j] = left >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      }
      const int8_t* wq = w + p0 * stride;
      const float* bq = b ? b + p0 * LANES : nullptr;
      Y* yq = y + p0 * LANES;
      int64_t r0 = 0;
      for (; r0 + ROWS <= m; r0 += ROWS)
        rows<ROWS>(x + r0 * ldx, ldx, groups, wq, stride, here, yq + r0 * n, n, bq, mask);
      const float* xr = x + r0 * ldx;
      Y* yr = yq + r0 * n;
      switch (m - r0) {
        case 1: rows<1>(xr, ldx, groups, wq, stride, here, yr, n, bq, mask); break;
        case 2: rows<2>(xr, ldx, groups, wq, stride, here, yr, n, bq, mask); break;
        case 3: rows<3>(xr, ldx, groups, wq, stride, here, yr, n, bq, mask); break;
        case 4: rows<4>(xr, ldx, groups, wq, stride, here, yr, n, bq, mask); break;
        case 5: rows<5>(xr, ldx, groups, wq, stride, here, yr, n, bq, mask); break;
        default: break;
      }
    }
  });
}

}  // namespace

namespace bentochat {

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "int8_linear: x in bfloat16 or float32");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 3 && w.size(2) == GROUP_BYTES && w.is_contiguous() &&
                  n <= w.size(0) * LANES,
              "int8_linear: w is not packed by native.pack_int8 for n features");
  const int64_t groups = w.size(1), inner = groups * GROUP, k = x.size(-1);
  TORCH_CHECK(k <= inner, "int8_linear: x does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor rows = x.reshape({-1, k}).to(at::kFloat);
  if (k != inner) rows = at::constant_pad_nd(rows, {0, inner - k});
  rows = rows.contiguous();
  at::Tensor y = at::empty({rows.size(0), n}, x.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= n);
    b = bias->data_ptr<float>();
  }
  const int64_t m = rows.size(0);
  if (m > 0) {
    const auto* ws = static_cast<const int8_t*>(w.data_ptr());
    if (x.scalar_type() == at::kFloat)
      matmul<float>(rows.data_ptr<float>(), m, groups, ws, w.size(0), y.data_ptr<float>(), n, b);
    else
      matmul<uint16_t>(rows.data_ptr<float>(), m, groups, ws, w.size(0), static_cast<uint16_t*>(y.data_ptr()), n, b);
  }
  return y.view(out_shape);
}

}  // namespace bentochat

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("int8_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::int8_linear);
}
