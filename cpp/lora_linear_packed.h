// The packed-GEMM path's entry points for lora_linear.cpp (defined in lora_linear_packed.cpp).
#pragma once

#include <ATen/ATen.h>

namespace openlora {

constexpr int64_t kPackedMaxTokens = 320;  // longer calls use at::addmm on the plain weight

// The packed data of `packed` after checking it was made by pack_weight from this very weight.
const float* packed_data(const at::Tensor& packed, const at::Tensor& weight);

// y = x @ weight.T + bias (x: fp32 [T, d_in] contiguous) through pw, weight's packed data, for
// calls of up to kPackedMaxTokens tokens; longer ones run at::addmm on the plain weight.
at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& weight, const float* pw,
                         const c10::optional<at::Tensor>& bias);

}  // namespace openlora
