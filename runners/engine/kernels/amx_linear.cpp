// BentoChat's bfloat16 matmul on Intel AMX: y = x W^T + b, with W packed by runners/engine/native.py.
//
// Every output element is the sum of its products taken in the same order whatever the number of
// rows: one tile multiply (TDPBF16PS) per 32 columns of the inner dimension, in order, from zero,
// then the bias in float32, then rounded to bfloat16. A row's tiles hold only that row's data, so a
// row gets the same bits alone and in a batch of any size (what the engine's batch invariance needs,
// and what oneDNN's kernels do not give past 32 rows on this kind of CPU).
//
// Packed W (runners/engine/native.py): [P][KC][4][16][16][2] bfloat16 for P panels of 64 output features and KC chunks of 32 of
// the inner dimension: in each chunk, four B tiles of 16 features, each 16 rows of (feature, pair of
// inner elements), the layout TDPBF16PS reads.
#include "kernels.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#ifdef BENTOCHAT_AMX
namespace {

constexpr int64_t PANEL = 64, CHUNK = 32, ROWS = 16;  // features per panel, inner per chunk, rows per tile
constexpr int64_t TILE = 16 * 32;                      // bfloat16 elements in one B tile

// Tiles 0-3: C (rows x 16 floats); 4: A (rows x 32 bfloat16); 5, 6: B (16 x 32 bfloat16).
void configure(int rows) {
  bentochat::TileConfig c;
  for (int t = 0; t < 5; t++) { c.rows[t] = rows; c.colsb[t] = 64; }
  for (int t = 5; t < 7; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
  bentochat::load_tile_config(c);
}

}  // namespace

namespace bentochat {

bool amx_available() {
  // Linux hands a process AMX's tile state only once it asks (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_available(), "this process may not use AMX");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 6);
  const int64_t panels = w.size(0), chunks = w.size(1), k = x.size(-1);
  TORCH_CHECK(k <= chunks * CHUNK && n <= panels * PANEL, "x or n does not fit the packed weight");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto rows2d = x.reshape({-1, k});
  if (k != chunks * CHUNK) rows2d = at::constant_pad_nd(rows2d, {0, chunks * CHUNK - k});
  rows2d = rows2d.contiguous();
  const int64_t m = rows2d.size(0), ldx = chunks * CHUNK;
  auto y = at::empty({m, n}, x.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() >= panels * PANEL);
    b = bias->data_ptr<float>();
  }
  if (m == 0) return y.view(out_shape);
  auto xs = static_cast<const uint16_t*>(rows2d.data_ptr());
  auto ws = static_cast<const uint16_t*>(w.data_ptr());
  auto ys = static_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    alignas(64) float c[4][ROWS][16];
    int configured = 0;
    for (int64_t p = first; p < last; p++) {
      const uint16_t* panel = ws + p * chunks * 4 * TILE;
      const int64_t features = std::min<int64_t>(PANEL, n - p * PANEL);
      for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, m - r0));
        if (rows != configured) { configure(rows); configured = rows; }
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const uint16_t* a = xs + r0 * ldx;
        for (int64_t kc = 0; kc < chunks; kc++) {
          const uint16_t* bt = panel + kc * 4 * TILE;
          if (kc + 1 < chunks) {  // the next chunk's 4 KB of weights (the hardware prefetchers miss tile loads)
            const char* next = reinterpret_cast<const char*>(bt + 4 * TILE);
            for (int line = 0; line < 64; line++) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
          }
          _tile_loadd(4, a + kc * CHUNK, ldx * 2);
          _tile_loadd(5, bt, 64);            _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, bt + TILE, 64);     _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(5, bt + 2 * TILE, 64); _tile_dpbf16ps(2, 4, 5);
          _tile_loadd(6, bt + 3 * TILE, 64); _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
        for (int r = 0; r < rows; r++)
          for (int64_t j = 0; j < 4 && j * 16 < features; j++) {
            __m512 v = _mm512_load_ps(c[j][r]);
            if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + p * PANEL + j * 16));
            const __m256i out = (__m256i)_mm512_cvtneps_pbh(v);
            uint16_t* dst = ys + (r0 + r) * n + p * PANEL + j * 16;
            const int64_t left = features - j * 16;
            if (left >= 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), out);
            else _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << left) - 1), out);
          }
      }
    }
    if (configured) _tile_release();
  });
  return y.view(out_shape);
}

}  // namespace bentochat
#else  // a level without AMX

namespace bentochat {

bool amx_available() { return false; }

at::Tensor amx_linear(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "amx_linear: this library is built without AMX");
}

}  // namespace bentochat
#endif

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("amx_available() -> bool", [] { return bentochat::amx_available(); });
  m.def("amx_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor", bentochat::amx_linear);
}
