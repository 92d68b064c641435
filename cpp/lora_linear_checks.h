// Argument checks for openlora::lora_linear, shared by the CPU and CUDA kernels.
// Every message names the argument it is about.
#pragma once

#include <ATen/ATen.h>

namespace openlora {

// Shapes, dtypes and devices. Returns nothing; throws c10::Error (RuntimeError) on the first problem.
//   x [T, d_in]; weight [d_out, d_in]; bias [d_out] or undefined
//   lora_a [S, r_max, d_in]; lora_b [S, d_out, r_max]
//   scalings [S] f32; ranks [S] i32; seg_indptr [G+1] i32; seg_slots [G] i32
inline void check_lora_linear_args(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scalings,
    const at::Tensor& ranks, const at::Tensor& seg_indptr, const at::Tensor& seg_slots) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, d_in], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  const auto device = x.device();
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have x's dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == device, name, " must be on x's device ", device, ", got ", t.device());
  };
  auto index = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
    TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, name, " must be on x's device ", device, ", got ", t.device());
  };
  const int64_t d_in = x.size(1);

  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d_in,
              "weight must be [d_out, d_in] with d_in = ", d_in, ", got shape ", weight.sizes());
  same(weight, "weight");
  const int64_t d_out = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out,
                "bias must be [d_out] with d_out = ", d_out, ", got shape ", bias->sizes());
    same(*bias, "bias");
  }

  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == d_in,
              "lora_a must be [S, r_max, d_in] with d_in = ", d_in, ", got shape ", lora_a.sizes());
  same(lora_a, "lora_a");
  const int64_t S = lora_a.size(0), r_max = lora_a.size(1);
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == S && lora_b.size(1) == d_out &&
                  lora_b.size(2) == r_max,
              "lora_b must be [S, d_out, r_max] = [", S, ", ", d_out, ", ", r_max, "], got shape ",
              lora_b.sizes());
  same(lora_b, "lora_b");

  index(scalings, "scalings", at::kFloat);
  TORCH_CHECK(scalings.size(0) == S, "scalings must be [S] with S = ", S, ", got shape ",
              scalings.sizes());
  index(ranks, "ranks", at::kInt);
  TORCH_CHECK(ranks.size(0) == S, "ranks must be [S] with S = ", S, ", got shape ", ranks.sizes());
  index(seg_indptr, "seg_indptr", at::kInt);
  TORCH_CHECK(seg_indptr.size(0) >= 1, "seg_indptr must be [G+1] with at least one entry, got shape ",
              seg_indptr.sizes());
  index(seg_slots, "seg_slots", at::kInt);
  TORCH_CHECK(seg_slots.size(0) == seg_indptr.size(0) - 1,
              "seg_slots must be [G] with G = len(seg_indptr) - 1 = ", seg_indptr.size(0) - 1,
              ", got shape ", seg_slots.sizes());
}

// Values of the index tensors, given contiguous CPU copies:
//   seg_indptr[0] == 0, seg_indptr[G] == T, non-decreasing; -1 <= seg_slots < S; 0 <= ranks <= r_max.
inline void check_lora_linear_values(const at::Tensor& ranks, const at::Tensor& seg_indptr,
                                     const at::Tensor& seg_slots, int64_t T, int64_t r_max) {
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  const int32_t* sl = seg_slots.data_ptr<int32_t>();
  const int64_t S = ranks.size(0), G = seg_slots.size(0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(rk[s] >= 0 && rk[s] <= r_max, "ranks[", s, "] = ", rk[s],
                " is out of range [0, r_max = ", r_max, "]");
  }
  TORCH_CHECK(ip[0] == 0, "seg_indptr must start at 0, got ", ip[0]);
  TORCH_CHECK(ip[G] == T, "seg_indptr must end at T = ", T, ", got ", ip[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(ip[g + 1] >= ip[g], "seg_indptr must be non-decreasing, got seg_indptr[", g,
                "] = ", ip[g], " > seg_indptr[", g + 1, "] = ", ip[g + 1]);
    TORCH_CHECK(sl[g] >= -1 && sl[g] < S, "seg_slots[", g, "] = ", sl[g],
                " is out of range [-1, S = ", S, ")");
  }
}

}  // namespace openlora
