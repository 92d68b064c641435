// Argument checks for openlora::paged_attention_decode, shared by the CPU and CUDA kernels.
// Every message names the argument it is about (services/executor/ops/reference.py has the same
// checks in Python).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace openlora {

// Shapes, dtypes, devices and the layout the kernels read (D contiguous). The dtype itself is the
// caller's check. q [N, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D];
// block_tables [N, max_blocks] i32; context_lens [N] i32.
inline void check_paged_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                                       const at::Tensor& context_lens, int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [N, H, D], got shape ", q.sizes());
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->dim() == 4 && t->size(3) == D,
                name, " must be [num_blocks, block_size, KVH, D] with D = ", D, ", got shape ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->stride(3) == 1 || D == 1, name, " must be contiguous in its last dim (D), got strides ",
                t->strides());
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t KVH = k_cache.size(2);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "q's heads H = ", H,
              " must be a multiple of k_cache's kv heads KVH = ", KVH);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == N,
              "block_tables must be [N, max_blocks] with N = ", N, ", got shape ",
              block_tables.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "block_tables must be int32, got ",
              block_tables.scalar_type());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == N,
              "context_lens must be [N] with N = ", N, ", got shape ", context_lens.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt, "context_lens must be int32, got ",
              context_lens.scalar_type());
  for (const auto& [t, name] :
       {std::pair{&block_tables, "block_tables"}, std::pair{&context_lens, "context_lens"}})
    TORCH_CHECK(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ",
                t->device());
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0 = none), got ", sliding_window);
}

// Values, on contiguous host copies: every context length fits its table and every block a query
// reads exists. Returns each sequence's first key lo[n] (past the sliding window) and the keys read
// in all.
inline std::pair<std::vector<int64_t>, int64_t> check_paged_attention_values(
    const int32_t* tables, const int32_t* ctx, int64_t N, int64_t max_blocks, int64_t bs,
    int64_t num_blocks, int64_t sliding_window) {
  std::vector<int64_t> lo(N);
  int64_t keys = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t c = ctx[n];
    TORCH_CHECK(c > 0 && c <= max_blocks * bs, "context_lens[", n, "] = ", c,
                " must be in [1, max_blocks * block_size = ", max_blocks * bs, "]");
    lo[n] = sliding_window > 0 ? std::max<int64_t>(0, c - sliding_window) : 0;
    for (int64_t j = lo[n] / bs; j <= (c - 1) / bs; ++j) {
      const int64_t b = tables[n * max_blocks + j];
      TORCH_CHECK(b >= 0 && b < num_blocks, "block_tables[", n, ", ", j, "] = ", b,
                  " is out of range [0, num_blocks = ", num_blocks, ")");
    }
    keys += c - lo[n];
  }
  return {std::move(lo), keys};
}

}  // namespace openlora
