// openlora::paged_attention_decode: one query token per sequence attending its paged K/V in place.
//
//   for n, h:                                      # q [N, H, D], out [N, H, D] (q's dtype)
//     c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
//     keys t in [lo, c) live at k_cache[block_tables[n, t // bs], t % bs, h // (H / KVH)]
//     out[n, h] = softmax(scale * q[n, h] @ K[lo:c].T) @ V[lo:c]
//
// CPU kernel: one work item per sequence (or per group of its kv heads, when there are too few
// sequences to keep every thread busy), split over threads with at::parallel_for. An item walks its
// blocks once, chunk by chunk, keeping an online softmax (running max m, sum l, fp32 accumulator acc)
// for every query head of its kv heads, so each K/V row is read from memory once, whole, and the
// next chunk's rows are prefetched while this one is computed. fp32 and
// bf16 caches, fp32 accumulation. Keys go in chunks of kChunk: score the chunk, update the softmax,
// add the chunk's V rows. The per-item loop (paged_attention_tiles.h) is compiled once per instruction
// set and picked at run time (cpu_isa.cpp); this file checks the arguments and splits the work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "paged_attention_checks.h"

namespace openlora {
namespace {

constexpr int64_t kMinTaskWork = 1 << 15;  // multiply-adds per parallel task, at least

at::Tensor paged_attention_decode_cpu(const at::Tensor& q_, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables_,
                                      const at::Tensor& context_lens_, double scale,
                                      int64_t sliding_window) {
  TORCH_CHECK(q_.dim() == 3, "q must be 3-D [N, H, D], got shape ", q_.sizes());
  TORCH_CHECK(q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16 on CPU, got ", q_.scalar_type());
  check_paged_attention_args(q_, k_cache, v_cache, block_tables_, context_lens_, sliding_window);
  const int64_t N = q_.size(0), H = q_.size(1), D = q_.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH;
  TORCH_CHECK(G <= kAttendMaxGroup, "q's heads per kv head H / KVH = ", G, " must be <= ", kAttendMaxGroup);

  const auto q = q_.contiguous();
  const auto block_tables = block_tables_.contiguous();
  const auto context_lens = context_lens_.contiguous();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  const auto checked =
      check_paged_attention_values(tables, ctx, N, max_blocks, bs, num_blocks, sliding_window);
  const std::vector<int64_t>& lo = checked.first;
  const int64_t keys = checked.second;

  auto out = at::empty({N, H, D}, q.options());
  if (N == 0) return out;
  const CacheView ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheView vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  // Work items: (sequence, group of nkv kv heads). All of a sequence's kv heads in one item where
  // that leaves every thread a few items; otherwise fewer heads per item (down to one).
  const int64_t threads = at::get_num_threads();
  int64_t nkv = KVH;
  while (nkv > 1 && (N * (KVH / nkv) < 4 * threads || nkv * G > kAttendMaxHeads)) {
    int64_t d = nkv - 1;
    while (KVH % d != 0) --d;  // the next smaller divisor of KVH
    nkv = d;
  }
  const int64_t groups = KVH / nkv, items = N * groups;
  const int64_t work_per_item = std::max<int64_t>(1, keys / N * nkv * G * D * 2);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / work_per_item);
  const auto& kernels = cpu_ops();
  const auto attend = q.scalar_type() == at::kFloat ? kernels.attend_f32 : kernels.attend_bf16;
  const int64_t elem = q.element_size();
  const char* qp = static_cast<const char*>(q.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    // qf [nkv * G, D], acc [nkv * G, D], scores [G, kAttendChunk]
    std::vector<float> buf(2 * nkv * G * D + kAttendChunk * G);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / groups, kv0 = (it % groups) * nkv;
      const int64_t off = (n * H + kv0 * G) * D * elem;
      attend(AttendItem{qp + off, k_cache.data_ptr(), v_cache.data_ptr(), ks, vs, tables + n * max_blocks, lo[n],
                        ctx[n], bs, kv0, nkv, G, D, static_cast<float>(scale), op + off, buf.data()});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("paged_attention_decode", &paged_attention_decode_cpu);
  m.impl("paged_attention_decode_async", &paged_attention_decode_cpu);
}

}  // namespace openlora
