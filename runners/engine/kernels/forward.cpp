// BentoChat's forward pass for the lean forward's families (Llama, Mistral, Qwen2, Qwen3), in bfloat16 on
// AMX or AVX-512 BF16 and in float32 on AVX-512, for prefill and decode alike: each row of a call is one
// token at its own position in its own sequence's blocks of a paged key-value cache, so one call runs every
// layer of a decode step (one row per sequence), a prompt's chunk (a row per token, one sequence) or several
// prompts together, and the final norm and the logits of the rows asked for. Every row's key and value are
// written to its sequence's block before any row attends, so a prompt's rows see each other causally. The
// matmuls are amx_linear's, bf16_linear's or f32_linear's (the weights' layout says which), or int8_linear's
// (int8 weights, quantization: int8); what lies between them (norms, rotary embeddings, the cache writes,
// attention, SiLU, the residual adds) is written here, because in Python each of those ~500 small operations a step costs a few microseconds of dispatch, about half of a decode
// step at batch 1 (README, Performance).
//
// In bfloat16 it rounds where transformers' bfloat16 modules round (after each elementwise operation); in
// float32 nothing is rounded between the operations. It computes each row from that row's data only, in
// the same order whatever the other rows or the thread count: a token gets the same bits alone, in any
// batch, in a prompt's chunk of any size, and the same keys and values whether it was prefilled or
// decoded. Attention sums in float32 over the row's own columns (0 .. its position), in column order,
// wherever its blocks lie (on AMX: the scores and the weighted sum as tile multiplies, see attend_amx).
#include "kernels.h"
#include "simd.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using namespace bentochat::simd;

// Rows of the work between the matmuls (norms, rotation, residual adds, SiLU) per thread at least: fewer
// take less time than waking a second thread.
constexpr int64_t GLUE_ROWS = 8;

// One key-value head's keys (or values) of one sequence in the paged cache ([blocks, kv_heads, block, dim]
// per layer): column j lies in block blocks[j / block], at j % block. A block holds a power of two columns,
// at least 16, so that 16 columns from a multiple of 16 lie together.
template <typename T>
struct Columns {
  T* head;                // block 0's rows of this key-value head
  const int64_t* blocks;  // the sequence's row of the block table
  int64_t block_stride, shift, dim;
  T* operator()(int64_t j) const {
    return head + blocks[j >> shift] * block_stride + (j & ((int64_t{1} << shift) - 1)) * dim;
  }
};

// v as the result of a tensor operation in T: rounded to bfloat16 (to nearest even), or as it is in float32
template <typename T>
inline Vec rounded(Vec v) {
  if constexpr (std::is_same_v<T, bf16>) return rounded_bf16(v);
  return v;
}

// e^x, within 2 ulps of float32 (Cephes' polynomial on x - n ln 2, then scaled by 2^n)
inline Vec exp_ps(Vec x) {
  x = max(min(x, set1(88.3762626647949f)), set1(-103.0f));
  const Vec n = round(x * set1(1.44269504088896341f));
  Vec r = fnma(n, set1(0.693359375f), x);
  r = fnma(n, set1(-2.12194440e-4f), r);
  Vec y = set1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = fma(y, r, set1(c));
  y = fma(y, r * r, r + set1(1.0f));
  return scale2(y, n);
}

// transformers' Llama RMSNorm: normalized in float32, rounded, scaled by the weight, rounded.
template <typename T>
void rms_norm(const T* x, const T* w, T* y, int64_t n, float eps) {
  Vec squares = zero();
  for (int64_t i = 0; i < n; i += 16) {
    const Vec v = load(x + i, first(n - i));
    squares = fma(v, v, squares);
  }
  const Vec scale = set1(1.0f / std::sqrt(sum(squares) / n + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const Mask m = first(n - i);
    store(y + i, load(w + i, m) * rounded<T>(load(x + i, m) * scale), m);
  }
}

// x * cos + rotate_half(x) * sin, each product and the sum rounded, in place on one head.
template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const Mask m = first(half - i);
    const Vec a = load(x + i, m), b = load(x + half + i, m);
    const Vec lo = rounded<T>(a * load(cos + i, m)) + rounded<T>((zero() - b) * load(sin + i, m));
    const Vec hi = rounded<T>(b * load(cos + half + i, m)) + rounded<T>(a * load(sin + half + i, m));
    store(x + i, lo, m);
    store(x + half + i, hi, m);
  }
}

// out[i] = h[i] + d[i], rounded (the residual add), in place on h.
template <typename T>
void add(T* h, const T* d, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const Mask m = first(n - i);
    store(h + i, load(h + i, m) + load(d + i, m), m);
  }
}

// silu(gate) * up, each rounded; gate and up are the two halves of one row.
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t n) {
  const T* up = gate_up + n;
  for (int64_t i = 0; i < n; i += 16) {
    const Mask m = first(n - i);
    const Vec g = load(gate_up + i, m);
    const Vec silu = rounded<T>(g / (set1(1.0f) + exp_ps(zero() - g)));
    store(out + i, silu * load(up + i, m), m);
  }
}

// Per query head g, its `length` scores (from scores + g * stride) turned into exp(score - the head's
// largest) in place, and their sum into sums[g]: the softmax, whose division comes with the weighted sum.
void softmax(float* scores, int64_t stride, int64_t groups, int64_t length, float* sums) {
  for (int64_t g = 0; g < groups; g++) {
    float* s = scores + g * stride;
    Vec highest = set1(-INFINITY);
    for (int64_t j = 0; j < length; j += 16) highest = blend(highest, max(highest, load(s + j, first(length - j))), first(length - j));
    const Vec most = set1(top(highest));
    Vec total = zero();
    for (int64_t j = 0; j < length; j += 16) {
      const Mask m = first(length - j);
      const Vec p = keep(exp_ps(load(s + j, m) - most), m);
      store(s + j, p, m);
      total = total + p;
    }
    sums[g] = sum(total);
  }
}

// sum_j probs[g][j] values[j] / sums[g] for each query head g, rounded: the values read once per column
// for up to 16 / CH heads at a time, whose sums stay in registers (dim = 16 * CH).
template <int CH, typename T>
void weighted_sum(const float* probs, int64_t stride, const float* sums, const Columns<T>& values, T* out,
                  int64_t groups, int64_t length) {
  constexpr int HEADS = 16 / CH > 0 ? 16 / CH : 1;
  constexpr int64_t dim = 16 * CH;
  for (int64_t g0 = 0; g0 < groups; g0 += HEADS) {
    const int64_t heads = std::min<int64_t>(HEADS, groups - g0);
    Vec acc[HEADS][CH];
    for (auto& row : acc)
      for (auto& v : row) v = zero();
    for (int64_t j = 0; j < length; j++) {
      Vec v[CH];
      const T* column = values(j);
      for (int c = 0; c < CH; c++) v[c] = load(column + 16 * c);
#pragma GCC unroll 16
      for (int g = 0; g < HEADS; g++)
        if (g < heads) {
          const Vec p = set1(probs[(g0 + g) * stride + j]);
          for (int c = 0; c < CH; c++) acc[g][c] = fma(p, v[c], acc[g][c]);
        }
    }
    for (int64_t g = 0; g < heads; g++) {
      const Vec total = set1(sums[g0 + g]);
      for (int c = 0; c < CH; c++) store(out + (g0 + g) * dim + 16 * c, acc[g][c] / total, first(16));
    }
  }
}

// attend() where the head dimension is 16 * CH: the queries scaled into float32 once, each key read once
// per column for every query head, the weighted sum in registers. probs: groups * length floats.
template <int CH, typename T>
void attend_fast(const T* q, const Columns<T>& keys, const Columns<T>& values, T* out, int64_t groups, int64_t length,
                 float* probs, float* sums, float* queries) {
  constexpr int64_t dim = 16 * CH;
  const Vec scale = set1(1.0f / std::sqrt(static_cast<float>(dim)));
  for (int64_t i = 0; i < groups * CH; i++) store(queries + 16 * i, load(q + 16 * i) * scale);
  for (int64_t j = 0; j < length; j++) {
    Vec k[CH];
    const T* column = keys(j);
    for (int c = 0; c < CH; c++) k[c] = load(column + 16 * c);
    for (int64_t g = 0; g < groups; g++) {
      Vec dot = load(queries + g * dim) * k[0];
      for (int c = 1; c < CH; c++) dot = fma(load(queries + g * dim + 16 * c), k[c], dot);
      probs[g * length + j] = sum(dot);
    }
  }
  softmax(probs, length, groups, length, sums);
  weighted_sum<CH>(probs, length, sums, values, out, groups, length);
}

// The query heads of one key-value head attending over columns 0 .. length - 1 of its cache: float32
// scores, softmax and weighted sum, rounded to the model's dtype once at the end.
template <typename T>
void attend(const T* q, const Columns<T>& keys, const Columns<T>& values, T* out, int64_t groups, int64_t dim,
            int64_t length, float* scores, float* sums) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int64_t j = 0; j < length; j++) {
    const T* k = keys(j);
    for (int64_t g = 0; g < groups; g++) {
      Vec dot = zero();
      for (int64_t d = 0; d < dim; d += 16) {
        const Mask m = first(dim - d);
        dot = fma(load(q + g * dim + d, m), load(k + d, m), dot);
      }
      scores[g * length + j] = sum(dot) * scale;
    }
  }
  softmax(scores, length, groups, length, sums);
  std::vector<float> acc(groups * dim, 0.0f);
  for (int64_t j = 0; j < length; j++) {
    const T* v = values(j);
    for (int64_t d = 0; d < dim; d += 16) {
      const Mask m = first(dim - d);
      const Vec vj = load(v + d, m);
      for (int64_t g = 0; g < groups; g++) {
        float* a = acc.data() + g * dim + d;
        store(a, fma(set1(scores[g * length + j]), vj, load(a, m)), m);
      }
    }
  }
  for (int64_t g = 0; g < groups; g++)
    for (int64_t d = 0; d < dim; d += 16) {
      const Mask m = first(dim - d);
      store(out + g * dim + d, load(acc.data() + g * dim + d, m) / set1(sums[g]), m);
    }
}

#ifdef BENTOCHAT_AMX
// A block's 16 columns of one key-value head (16 * dim bfloat16, together) on their way into the cache
// level `hint` names: the hardware prefetchers miss tile loads, and a sequence's blocks lie apart.
template <int HINT>
inline void prefetch_block(const bf16* column, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(column);
  for (int64_t line = 0; line < dim / 2; line++) _mm_prefetch(p + 64 * line, static_cast<_mm_hint>(HINT));
}

// Columns j0 .. j0 + 31 of the values (zeros past `length`), dimensions d0 .. d0 + 16 * chunks - 1, as
// AMX B tiles: tile c, row r holds the pairs (column j0 + 2r, j0 + 2r + 1) of dimensions d0 + 16c + n, n < 16.
inline void paired_values(const Columns<bf16>& values, int64_t j0, int64_t length, int64_t d0, int64_t chunks, bf16* vt) {
  const __m512i even = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));
  for (int64_t r = 0; r < 16; r++) {
    const int64_t j = j0 + 2 * r;
    for (int64_t c = 0; c < chunks; c += 2) {
      const __m512i a = j < length ? _mm512_loadu_si512(values(j) + d0 + 16 * c) : _mm512_setzero_si512();
      const __m512i b = j + 1 < length ? _mm512_loadu_si512(values(j + 1) + d0 + 16 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(vt + c * 512 + r * 32, _mm512_permutex2var_epi16(a, even, b));
      _mm512_storeu_si512(vt + (c + 1) * 512 + r * 32, _mm512_permutex2var_epi16(a, odd, b));
    }
  }
}

// The 16 x 16 floats at t (row i at t + 16 i) transposed: out[n] is column n (moved, not computed).
inline void transpose16(const float* t, __m512 out[16]) {
  __m512 r[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    const __m512 a = _mm512_load_ps(t + 16 * i), b = _mm512_load_ps(t + 16 * i + 16);
    r[i] = _mm512_unpacklo_ps(a, b);
    r[i + 1] = _mm512_unpackhi_ps(a, b);
  }
  for (int g = 0; g < 16; g += 4) {  // rows g .. g + 3: u[g + c] holds their columns c, c + 4, c + 8, c + 12
    auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(r[g]), pd(r[g + 2])));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(r[g]), pd(r[g + 2])));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(r[g + 1]), pd(r[g + 3])));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(r[g + 1]), pd(r[g + 3])));
  }
  for (int c = 0; c < 4; c++) {
    const __m512 lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), lo2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE), hi2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    out[c] = _mm512_shuffle_f32x4(lo, lo2, 0x88);
    out[c + 4] = _mm512_shuffle_f32x4(lo, lo2, 0xDD);
    out[c + 8] = _mm512_shuffle_f32x4(hi, hi2, 0x88);
    out[c + 12] = _mm512_shuffle_f32x4(hi, hi2, 0xDD);
  }
}

// One key-value head's values of one sequence as paired_values' B tiles, kept by a thread for its passes
// over that head in a layer (a prompt's chunk makes a pass every 16 / groups rows, each over the same
// columns): blocks of 32 columns, each [dim / 16 tiles][512], paired once. Only whole blocks are kept (a
// block's tiles do not depend on the pass's length); a pass pairs its last, partial block itself.
struct PairedValues {
  int64_t columns = 0;  // at most (the forward pass's longest row)
  const bf16* head = nullptr;  // whose (Columns' head and blocks), or none yet
  const int64_t* blocks = nullptr;
  int64_t done = 0;  // blocks paired
  std::unique_ptr<bf16[]> tiles;  // (allocated at first use, not cleared)

  // the tiles of whole blocks 0 .. length / 32 - 1 of `values`, pairing those not yet paired
  const bf16* upto(const Columns<bf16>& values, int64_t length) {
    const int64_t dim = values.dim;
    if (!tiles) tiles.reset(new bf16[columns / 32 * 32 * dim]);
    if (head != values.head || blocks != values.blocks) { head = values.head; blocks = values.blocks; done = 0; }
    for (; done < length / 32; done++)
      for (int64_t d0 = 0; d0 < dim; d0 += 64)
        paired_values(values, 32 * done, length, d0, std::min<int64_t>(4, (dim - d0) / 16), tiles.get() + done * 32 * dim + d0 * 32);
    return tiles.get();
  }
};

// attend() on AMX, for head dimensions of 32 * CHUNKS, for `rows` rows of one sequence at consecutive
// positions (a prompt's, rows * groups <= 16; row i's query heads q[i], its result out[i], its columns
// 0 .. lengths[i] - 1): the scores of 16 columns at a time in one tile multiply per 32 of the head
// dimension (the keys straight from the cache as A, every row's query heads as B: 16 columns by up to
// 16 queries); per row and head, across that row's own columns, the softmax in float32 on AVX-512; then
// the weighted sum of the values as tile multiplies too, 32 columns at a time: the probabilities rounded
// to bfloat16 as A (as PyTorch's flash attention does in bfloat16), the values paired as B (once a layer
// for a thread's passes over a head, see PairedValues), sums in float32 tiles of 16 queries by 16
// dimensions. Each row of a tile multiply is that query's alone, and a query's columns past its own are
// zeros, so a row gets the same bits alone and with others. buffer: see Attention.
template <int CHUNKS>
void attend_amx(const bf16* const* q, const int64_t* lengths, int64_t rows, const Columns<bf16>& keys,
                const Columns<bf16>& values, bf16* const* out, int64_t groups, float* tiles, float* probs, float* sums,
                bf16* qt, bf16* tail, bf16* pt, bf16* vt, PairedValues& paired) {
  constexpr int64_t dim = 32 * CHUNKS;
  const int64_t queries = rows * groups, length = lengths[rows - 1];  // (the last row's is the longest)
  // The queries transposed into B tiles: tile c, row r holds (query n, inner pair 32c + 2r, +1) for n < 16.
  std::fill_n(qt, 512 * CHUNKS, 0);
  for (int64_t n = 0; n < queries; n++)
    for (int64_t d = 0; d < dim; d++)
      qt[(d / 32) * 512 + (d % 32) / 2 * 32 + n * 2 + d % 2] = q[n / groups][(n % groups) * dim + d];
  _tile_loadd(2, qt, 64);
  if constexpr (CHUNKS > 1) _tile_loadd(3, qt + 512, 64);
  if constexpr (CHUNKS > 2) _tile_loadd(4, qt + 1024, 64);
  if constexpr (CHUNKS > 3) _tile_loadd(5, qt + 1536, 64);
  const int64_t stride = (length + 15) / 16 * 16;  // of probs: a query's columns
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(dim)));
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  for (int64_t j0 = 0; j0 < length; j0 += 16) {
    const bf16* a = keys(j0);  // (16 columns in one block)
    if (j0 + 32 < length) prefetch_block<_MM_HINT_T0>(keys(j0 + 32), dim);  // two blocks ahead
    prefetch_block<_MM_HINT_T1>(values(j0), dim);                          // for the weighted sum
    if (length - j0 < 16) {  // the last columns, padded with zeros (rows past the block may not exist)
      std::fill_n(std::copy_n(a, (length - j0) * dim, tail), (16 - (length - j0)) * dim, 0);
      a = tail;
    }
    _tile_zero(0);
    _tile_loadd(1, a, dim * 2); _tile_dpbf16ps(0, 1, 2);
    if constexpr (CHUNKS > 1) { _tile_loadd(1, a + 32, dim * 2); _tile_dpbf16ps(0, 1, 3); }
    if constexpr (CHUNKS > 2) { _tile_loadd(1, a + 64, dim * 2); _tile_dpbf16ps(0, 1, 4); }
    if constexpr (CHUNKS > 3) { _tile_loadd(1, a + 96, dim * 2); _tile_dpbf16ps(0, 1, 5); }
    _tile_stored(0, tiles, 64);  // [16 columns][16 heads]
    if (queries <= 4) {  // query n's 16 columns, scaled (a few gathered, else all transposed)
      for (int64_t n = 0; n < queries; n++)
        _mm512_store_ps(probs + n * stride + j0, _mm512_mul_ps(_mm512_i32gather_ps(column, tiles + n, 4), scale));
    } else {
      __m512 by_query[16];
      transpose16(tiles, by_query);
      for (int64_t n = 0; n < queries; n++) _mm512_store_ps(probs + n * stride + j0, _mm512_mul_ps(by_query[n], scale));
    }
  }
  // The probabilities as A: query n's row in bfloat16, zeros past its columns (and in rows past the queries).
  const int64_t width = (length + 31) / 32 * 32;
  for (int64_t n = 0; n < 16; n++) {
    bf16* row = pt + n * width;
    const int64_t own = n < queries ? lengths[n / groups] : 0;
    if (n < queries) softmax(probs + n * stride, stride, 1, own, sums + n);
    for (int64_t j = 0; j < width; j += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(first(std::max<int64_t>(0, own - j)), probs + n * stride + j);
      const __m512 hi = _mm512_maskz_loadu_ps(first(std::max<int64_t>(0, own - j - 16)), probs + n * stride + j + 16);
      _mm512_storeu_si512(row + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
  // The values' whole blocks of 32 columns kept (a decode step's row makes the only pass over its sequence's
  // values: there each block is paired as it comes), then the rest.
  const bool keep = rows > 1;
  const bf16* whole = keep ? paired.upto(values, length) : nullptr;
  const int64_t part = keep ? length / 32 * 32 : 0;
  for (int64_t d0 = 0; keep && d0 < dim && part < length; d0 += 64)
    paired_values(values, part, length, d0, std::min<int64_t>(4, (dim - d0) / 16), vt + d0 * 32);
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {  // 64 dimensions (four result tiles) at a time
    const int64_t chunks = std::min<int64_t>(4, (dim - d0) / 16);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t j0 = 0; j0 < length; j0 += 32) {
      const bf16* v = j0 < part ? whole + j0 * dim + d0 * 32 : keep ? vt + d0 * 32 : vt;
      if (!keep) paired_values(values, j0, length, d0, chunks, vt);
      _tile_loadd(4, pt + j0, width * 2);
      _tile_loadd(5, v, 64); _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(5, v + 512, 64); _tile_dpbf16ps(1, 4, 5);
      if (chunks > 2) { _tile_loadd(5, v + 1024, 64); _tile_dpbf16ps(2, 4, 5); _tile_loadd(5, v + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, probs, 64); _tile_stored(1, probs + 256, 64);  // [16 queries][16 dimensions] each
    if (chunks > 2) { _tile_stored(2, probs + 512, 64); _tile_stored(3, probs + 768, 64); }
    for (int64_t n = 0; n < queries; n++)
      for (int64_t c = 0; c < chunks; c++)
        store(out[n / groups] + (n % groups) * dim + d0 + 16 * c,
              Vec{_mm512_div_ps(_mm512_load_ps(probs + c * 256 + n * 16), _mm512_set1_ps(sums[n]))}, first(16));
  }
}

// Every tile 16 rows of 64 bytes: the attention's scores, keys and queries.
void configure_tiles() {
  bentochat::TileConfig c;
  for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
  bentochat::load_tile_config(c);
}

void release_tiles() { _tile_release(); }
#else  // a level without AMX: attention on tiles never runs (amx_available() is false)
void configure_tiles() {}
void release_tiles() {}
#endif

// attend() for rows of one sequence at consecutive positions and one key-value head: on AMX (``tiles``),
// in bfloat16 where the head dimension is 32, 64, 96 or 128 and there are at most 16 query heads per
// key-value head, up to 16 / groups rows in one pass over the keys (tiles configured by the caller, see
// configure_tiles); elsewhere one row at a time.
template <typename T>
struct Attention {
  static bool on_tiles(bool tiles, int64_t groups, int64_t dim) {
    return tiles && std::is_same_v<T, bf16> && dim % 32 == 0 && dim <= 128 && groups <= 16;
  }

  int64_t groups, dim;
  bool amx;
  std::vector<float> buffer;  // float scratch, aligned to 64 bytes within: the AMX path's tile and probabilities
  std::vector<float> sums, queries;
  std::vector<bf16> qt, tail, pt, vt;  // (the AMX path's tiles in memory)
#ifdef BENTOCHAT_AMX
  PairedValues paired;
#endif

  Attention(int64_t groups, int64_t dim, int64_t longest, bool tiles)
      : groups(groups), dim(dim), amx(on_tiles(tiles, groups, dim)),
        buffer(amx ? 16 + 256 + std::max<int64_t>(1024, 16 * ((longest + 15) / 16 * 16)) : groups * longest),
        sums(amx ? 16 : groups), queries(amx ? 0 : groups * dim), qt(amx ? 512 * (dim / 32) : 0),
        tail(amx ? 16 * dim : 0), pt(amx ? 16 * ((longest + 31) / 32 * 32) : 0), vt(amx ? 32 * dim : 0) {
#ifdef BENTOCHAT_AMX
    paired.columns = longest;
#endif
  }

  // rows of one sequence (row i's query heads q[i], its result out[i], its columns 0 .. lengths[i] - 1)
  void operator()(const T* const* q, const int64_t* lengths, int64_t rows, const Columns<T>& keys,
                  const Columns<T>& values, T* const* out) {
#ifdef BENTOCHAT_AMX
    if constexpr (std::is_same_v<T, bf16>) {
      if (amx) {
        float* tiles = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
        float* probs = tiles + 256;
        auto a = sums.data();
        switch (dim / 32) {
          case 1: return attend_amx<1>(q, lengths, rows, keys, values, out, groups, tiles, probs, a, qt.data(), tail.data(), pt.data(), vt.data(), paired);
          case 2: return attend_amx<2>(q, lengths, rows, keys, values, out, groups, tiles, probs, a, qt.data(), tail.data(), pt.data(), vt.data(), paired);
          case 3: return attend_amx<3>(q, lengths, rows, keys, values, out, groups, tiles, probs, a, qt.data(), tail.data(), pt.data(), vt.data(), paired);
          default: return attend_amx<4>(q, lengths, rows, keys, values, out, groups, tiles, probs, a, qt.data(), tail.data(), pt.data(), vt.data(), paired);
        }
      }
    }
#endif
    for (int64_t i = 0; i < rows; i++) one(q[i], keys, values, out[i], lengths[i]);
  }

  void one(const T* q, const Columns<T>& keys, const Columns<T>& values, T* out, int64_t length) {
    float* probs = buffer.data();
    if (dim % 16 == 0) switch (dim / 16) {
      case 1: return attend_fast<1>(q, keys, values, out, groups, length, probs, sums.data(), queries.data());
      case 2: return attend_fast<2>(q, keys, values, out, groups, length, probs, sums.data(), queries.data());
      case 4: return attend_fast<4>(q, keys, values, out, groups, length, probs, sums.data(), queries.data());
      case 8: return attend_fast<8>(q, keys, values, out, groups, length, probs, sums.data(), queries.data());
      default: break;
    }
    attend(q, keys, values, out, groups, dim, length, probs, sums.data());
  }
};

template <typename T>
T* data(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// The model's matmuls in the order of the weights: per layer qkv, o, gate_up, down, then the logits.
// Where rows run on LoRA adapters, matmul i adds lora_b[i] (lora_a[i] x * lora_mask[i]), as
// runners/engine/lora.py's LoRALinear does: the 0/1 mask keeps each row's own adapter's columns, so a
// row on none gets exactly the base product.
template <typename T>
struct Matmuls {
  at::TensorList weights;
  const c10::List<c10::optional<at::Tensor>>& biases;
  const c10::List<c10::optional<at::Tensor>>& lora_a;
  const c10::List<c10::optional<at::Tensor>>& lora_b;
  const c10::List<c10::optional<at::Tensor>>& lora_mask;

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
    if (w.scalar_type() == at::kChar) return bentochat::int8_linear(x, w, n, bias);  // (quantization: int8)
    if (w.scalar_type() == at::kByte) return bentochat::int4_linear(x, w, n, bias);  // (quantization: int4)
    if constexpr (std::is_same_v<T, bf16>)  // the weights' layout says which kernel packed them
      return w.dim() == 6 ? bentochat::amx_linear(x, w, n, bias) : bentochat::bf16_linear(x, w, n, bias);
    return bentochat::f32_linear(x, w, n, bias);
  }

  // matmul i of x; rows: which rows of the forward pass x holds, where not all (the logits' rows)
  at::Tensor operator()(size_t i, const at::Tensor& x, int64_t n, const c10::optional<at::Tensor>& rows = c10::nullopt) const {
    at::Tensor y = linear(x, weights[i], n, biases.get(i));
    if (lora_mask.empty() || !lora_mask.get(i).has_value()) return y;
    const at::Tensor all = lora_mask.get(i)->view({-1, lora_mask.get(i)->size(-1)});
    const at::Tensor mask = rows.has_value() ? all.index_select(0, *rows) : all;
    const at::Tensor low = linear(x, *lora_a.get(i), mask.size(-1), c10::nullopt);
    return y.add_(linear(low.mul_(mask), *lora_b.get(i), n, c10::nullopt));
  }
};

// The arguments of forward() and of its body for the model's dtype.
#define FORWARD_ARGUMENTS                                                                                       \
  const at::Tensor &embeddings, const at::Tensor &slots, const at::Tensor &block_table, const at::Tensor &positions, \
      const at::Tensor &logit_rows,                                                                                  \
      const at::Tensor &cos, const at::Tensor &sin, at::TensorList weights,                                          \
      const c10::List<c10::optional<at::Tensor>> &biases, const c10::List<c10::optional<at::Tensor>> &lora_a,         \
      const c10::List<c10::optional<at::Tensor>> &lora_b, const c10::List<c10::optional<at::Tensor>> &lora_mask,      \
      at::TensorList norms, at::TensorList head_norms, const at::Tensor &final_norm, at::TensorList keys,             \
      at::TensorList values, int64_t heads, int64_t kv_heads, int64_t intermediate, int64_t vocab, double eps

// One forward pass: embeddings [rows, hidden] of the rows' tokens, row r at position positions[r] of the
// sequence whose blocks row slots[r] of block_table [sequences, blocks] names, in the paged caches (keys[l],
// values[l]: [blocks, kv_heads, block, dim], block a power of two >= 16); cos and sin [rows, dim] at those
// positions. Per layer l: weights[4l..4l+3] qkv, o, gate_up, down packed for amx_linear or bf16_linear
// (bfloat16) or f32_linear (float32), or for int8_linear (int8, either dtype), with biases alike; norms[2l],
// norms[2l+1] the input and post-attention norms; head_norms[2l], head_norms[2l+1]
// Qwen3's q and k norms (none for the other families); weights[4 * layers] the logits' (lm_head). The
// LoRA lists are empty, or hold an entry per weight (see Matmuls). Writes each row's key and value into
// its sequence's block and returns the logits [len(logit_rows), vocab], in the model's dtype, of the rows logit_rows names.
template <typename T>
at::Tensor run(FORWARD_ARGUMENTS) {
  const int64_t layers = keys.size(), rows = embeddings.size(0), hidden = embeddings.size(1);
  const int64_t dim = cos.size(1), groups = heads / kv_heads, qkv_width = (heads + 2 * kv_heads) * dim;
  const auto dtype = embeddings.scalar_type();
  // bfloat16 attention on AMX where the matmuls are (packed for amx_linear), or int8 where AMX is granted
  const bool amx = std::is_same_v<T, bf16> && (weights[0].dim() == 6 ||
                                               ((weights[0].scalar_type() == at::kChar || weights[0].scalar_type() == at::kByte) &&
                                                bentochat::amx_available()));
  if (amx) TORCH_CHECK(bentochat::amx_available(), "this process may not use AMX");
  TORCH_CHECK(embeddings.is_contiguous() && embeddings.dim() == 2);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == dtype && cos.size(0) == rows);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == rows && slots.scalar_type() == at::kLong &&
              slots.numel() == rows && logit_rows.scalar_type() == at::kLong);
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2 && block_table.is_contiguous());
  const size_t matmuls = 4 * layers + 1;
  TORCH_CHECK(weights.size() == matmuls && biases.size() == matmuls &&
              (lora_mask.empty() || (lora_a.size() == matmuls && lora_b.size() == matmuls && lora_mask.size() == matmuls)) &&
              static_cast<int64_t>(norms.size()) == 2 * layers && (head_norms.empty() || static_cast<int64_t>(head_norms.size()) == 2 * layers));
  const auto position = positions.contiguous(), slot_of = slots.contiguous(), wanted = logit_rows.contiguous();
  const int64_t* pos = position.data_ptr<int64_t>();
  const int64_t* slot = slot_of.data_ptr<int64_t>();
  for (int64_t l = 0; l < layers; l++) {
    TORCH_CHECK(keys[l].is_contiguous() && values[l].is_contiguous() && keys[l].scalar_type() == dtype &&
                values[l].scalar_type() == dtype && keys[l].size(1) == kv_heads &&
                keys[l].size(3) == dim && keys[l].sizes() == values[l].sizes() && keys[l].sizes() == keys[0].sizes());
  }
  const int64_t blocks = keys[0].size(0), block = keys[0].size(2), width = block_table.size(1);
  const int64_t shift = __builtin_ctzll(static_cast<uint64_t>(block));
  TORCH_CHECK(block >= 16 && (block & (block - 1)) == 0, "a cache block holds a power of two columns, at least 16");
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; r++) {  // the blocks of every column a row writes or reads exist
    TORCH_CHECK(pos[r] >= 0 && (pos[r] >> shift) < width && slot[r] >= 0 && slot[r] < block_table.size(0),
                "a row's sequence or position is outside the block table");
    for (int64_t i = 0; i <= pos[r] >> shift; i++)
      TORCH_CHECK(table[slot[r] * width + i] >= 0 && table[slot[r] * width + i] < blocks, "block_table: no such block");
  }
  for (int64_t i = 0; i < wanted.numel(); i++)
    TORCH_CHECK(wanted.data_ptr<int64_t>()[i] >= 0 && wanted.data_ptr<int64_t>()[i] < rows, "logit_rows: no such row");
  const Matmuls<T> matmul{weights, biases, lora_a, lora_b, lora_mask};

  at::Tensor h = embeddings.clone();
  at::Tensor x = at::empty({rows, hidden}, h.options());
  at::Tensor attended = at::empty({rows, heads * dim}, h.options());
  at::Tensor mixed = at::empty({rows, intermediate}, h.options());
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; r++) longest = std::max(longest, pos[r] + 1);
  // The rows that attend together: a prompt's consecutive rows, as many as make 16 queries on AMX tiles.
  const int64_t together = Attention<T>::on_tiles(amx, groups, dim) ? 16 / groups : 1;
  std::vector<int64_t> starts;
  for (int64_t r = 0; r < rows; r++)
    if (starts.empty() || r - starts.back() >= together || slot[r] != slot[r - 1] || pos[r] != pos[r - 1] + 1)
      starts.push_back(r);
  const int64_t blocks_of_rows = static_cast<int64_t>(starts.size());
  starts.push_back(rows);
  // key-value head g of row r's sequence, in a layer's keys or values
  auto columns = [&](T* cache, int64_t r, int64_t g) {
    return Columns<T>{cache + g * block * dim, table + slot[r] * width, kv_heads * block * dim, shift, dim};
  };

  // What lies between the matmuls, row by row; on several threads where there are enough rows.
  auto each_row = [rows](const auto& f) {
    at::parallel_for(0, rows, GLUE_ROWS, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; r++) f(r);
    });
  };
  T *hs = data<T>(h), *xs = data<T>(x);
  each_row([&](int64_t r) { rms_norm(hs + r * hidden, data<T>(norms[0]), xs + r * hidden, hidden, eps); });
  for (int64_t l = 0; l < layers; l++) {
    at::Tensor qkv = matmul(4 * l, x, qkv_width);
    T* kc = data<T>(keys[l]);
    T* vc = data<T>(values[l]);
    each_row([&](int64_t r) {  // every row's key and value in its block before any row attends
      T* row = data<T>(qkv) + r * qkv_width;
      for (int64_t head = 0; head < heads + kv_heads; head++) {
        T* v = row + head * dim;
        if (!head_norms.empty()) rms_norm(v, data<T>(head_norms[2 * l + (head >= heads)]), v, dim, eps);
        rotate(v, data<T>(cos) + r * dim, data<T>(sin) + r * dim, dim);
      }
      for (int64_t g = 0; g < kv_heads; g++) {
        std::copy_n(row + (heads + g) * dim, dim, columns(kc, r, g)(pos[r]));
        std::copy_n(row + (heads + kv_heads + g) * dim, dim, columns(vc, r, g)(pos[r]));
      }
    });
    // (a key-value head's range of blocks to each thread: late blocks of a prompt attend over more columns)
    at::parallel_for(0, blocks_of_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
      Attention<T> attention(groups, dim, longest, amx);
      if (attention.amx) configure_tiles();
      const T* q[16];
      T* out[16];
      int64_t lengths[16];
      for (int64_t i = begin; i < end; i++) {
        const int64_t b = i % blocks_of_rows, g = i / blocks_of_rows, r0 = starts[b], n = starts[b + 1] - r0;
        for (int64_t j = 0; j < n; j++) {
          q[j] = data<T>(qkv) + (r0 + j) * qkv_width + g * groups * dim;
          out[j] = data<T>(attended) + (r0 + j) * heads * dim + g * groups * dim;
          lengths[j] = pos[r0 + j] + 1;
        }
        attention(q, lengths, n, columns(kc, r0, g), columns(vc, r0, g), out);
      }
      if (attention.amx) release_tiles();
    });
    const at::Tensor o = matmul(4 * l + 1, attended, hidden);
    each_row([&](int64_t r) {
      add(hs + r * hidden, data<T>(o) + r * hidden, hidden);
      rms_norm(hs + r * hidden, data<T>(norms[2 * l + 1]), xs + r * hidden, hidden, eps);
    });
    const at::Tensor gate_up = matmul(4 * l + 2, x, 2 * intermediate);
    each_row([&](int64_t r) {
      silu_mul(data<T>(gate_up) + r * 2 * intermediate, data<T>(mixed) + r * intermediate, intermediate);
    });
    const at::Tensor down = matmul(4 * l + 3, mixed, hidden);
    each_row([&](int64_t r) {  // and the next layer's input norm
      add(hs + r * hidden, data<T>(down) + r * hidden, hidden);
      if (l + 1 < layers) rms_norm(hs + r * hidden, data<T>(norms[2 * l + 2]), xs + r * hidden, hidden, eps);
    });
  }
  const int64_t outputs = wanted.numel();
  at::Tensor last = at::empty({outputs, hidden}, h.options());
  for (int64_t i = 0; i < outputs; i++)
    rms_norm(hs + wanted.data_ptr<int64_t>()[i] * hidden, data<T>(final_norm), data<T>(last) + i * hidden, hidden, eps);
  return matmul(4 * layers, last, vocab, wanted);
}

at::Tensor forward(FORWARD_ARGUMENTS) {
  const auto dtype = embeddings.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "the native forward runs bfloat16 and float32 models");
#if defined(BENTOCHAT_BF16) || defined(BENTOCHAT_AVX2)
  auto body = dtype == at::kBFloat16 ? run<bf16> : run<float>;
#else
  TORCH_CHECK(dtype == at::kFloat, "forward: a bfloat16 model, and this library is built without AVX-512 BF16");
  auto body = run<float>;
#endif
  return body(embeddings, slots, block_table, positions, logit_rows, cos, sin, weights, biases, lora_a, lora_b, lora_mask, norms,
              head_norms, final_norm, keys, values, heads, kv_heads, intermediate, vocab, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bentochat, m) {
  m.def("forward(Tensor embeddings, Tensor slots, Tensor block_table, Tensor positions, Tensor logit_rows, Tensor cos, Tensor sin, Tensor[] weights, Tensor?[] biases, "
        "Tensor?[] lora_a, Tensor?[] lora_b, Tensor?[] lora_mask, Tensor[] norms, Tensor[] head_norms, Tensor final_norm, "
        "Tensor(a!)[] keys, Tensor(b!)[] values, int heads, int kv_heads, int intermediate, int vocab, float eps) -> Tensor",
        forward);
}
