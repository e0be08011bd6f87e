// BentoChat's native kernels, for one another: the matmuls forward.cpp calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <immintrin.h>

// The instruction sets this library holds: runners/engine/native_build.py builds one library per level
// (AVX2 and FMA; AVX-512 F/BW/VL; with AVX-512 BF16 and VNNI; with AMX too), native.py loads the highest this
// CPU runs. Code that
// needs more than its level is compiled out, so a library holds no instruction its CPU may lack: there the
// kernels that need it refuse, and amx_available() is false.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#define BENTOCHAT_AMX 1
#endif
#ifdef __AVX512BF16__
#define BENTOCHAT_BF16 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define BENTOCHAT_VNNI 1
#endif
#ifndef __AVX512F__  // the AVX2 level: bfloat16 widened to float32 in registers, rounded back in software
#define BENTOCHAT_AVX2 1
#endif

namespace bentochat {

// AMX's tile configuration (LDTILECFG's 64 bytes, palette 1): each tile's rows and bytes a row.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#ifdef BENTOCHAT_AMX
// LDTILECFG from ``c``. The compiler does not see the instruction read ``c``'s memory, and may drop the
// stores that fill it (seen with GCC: an illegal-instruction fault); the barrier keeps them.
inline void load_tile_config(const TileConfig& c) {
  asm volatile("" ::: "memory");
  _tile_loadconfig(&c);
}
#endif

// Whether this process may use AMX's tiles (Linux grants them on request, once): never below the AMX level.
bool amx_available();

// y = x W^T + b in bfloat16 on AMX (amx_linear.cpp): W packed by runners/engine/native.py, n its output
// features, b float32.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

// y = x W^T + b in bfloat16 on AVX-512 BF16 or AVX2, without AMX (avx_linear.cpp): W packed by
// runners/engine/native.py.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

// y = x W^T + b in float32 on AVX-512 or AVX2 (avx_linear.cpp): W packed by runners/engine/native.py.
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

// y = x W^T + b with W in int8, one float32 scale per 32 inner elements of a feature: x and y in float32 on AVX-512
// or AVX2, or in bfloat16 with x quantized alike on AMX, AVX-512 VNNI or AVX2 (int8_linear.cpp): W packed by
// runners/engine/native.py (pack_int8).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

// y = x W^T + b with W in 4 bits, a float32 scale and offset per 32 inner elements of a feature, x and y in
// bfloat16 quantized as int8_linear's, on AMX, AVX-512 VNNI or AVX2 (int8_linear.cpp): W packed by
// runners/engine/native.py (pack_int4).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

}  // namespace bentochat
