// BentoChat's bfloat16 matmul on Intel AMX (amx_linear.cpp), for the other kernels of the extension.
#pragma once

#include <ATen/core/Tensor.h>

namespace bentochat {

// Whether this process may use AMX's tiles (Linux grants them on request, once).
bool amx_available();

// y = x W^T + b in bfloat16: W packed by runners/engine/amx.py, n its output features, b float32 padded.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);

}  // namespace bentochat
