// One instruction set's CpuKernels table (cpu_kernels.h), for the file that defines OPENLORA_ISA.
#pragma once

#include "layer_ops_tiles.h"
#include "lora_paged_tiles.h"
#include "paged_attention_tiles.h"

namespace openlora {
namespace OPENLORA_ISA {

extern const CpuKernels kCpuKernels;
const CpuKernels kCpuKernels = {
    &paged_segments<float>,       &paged_segments<bf16_bits>,
    &paged_segments<float, bf16_bits>,
    &attend_item<float>,          &attend_item<bf16_bits>,
    &norm_rows<float>,            &norm_rows<bf16_bits>,
    &silu_mul_range<float>,       &silu_mul_range<bf16_bits>,
    &rotary_rows<float>,          &rotary_rows<bf16_bits>,
};

}  // namespace OPENLORA_ISA
}  // namespace openlora
