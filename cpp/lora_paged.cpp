// openlora::lora_paged_add_ : each segment's LoRA delta read in place from the paged adapter arena.
//
// The arena holds every host-resident adapter at its true rank in fixed-size pages of P elements
// (services/executor/adapters/arena.py). One (layer, module) of an adapter of rank r over a
// projection [d_out, d_in] takes r * ca pages for A (ca = ceil(d_in / P): row k of lora_A is pages
// k*ca .. k*ca+ca-1, the last one partly used) and r * cb pages for B^T (cb = ceil(d_out / P): row k
// of lora_B.T, i.e. column k of lora_B). page_index lists those pages; seg_meta[g, lm] = (offset of
// the (layer, module)'s first A page id in page_index, r), followed by its r*cb B^T page ids.
//
//   y [T, d_out] (updated in place), x [T, d_in], arena [NP, P] (x's dtype, or bfloat16 pages under
//   float32 x: --lora-dtype bfloat16, widened to fp32 as read), page_index [E] i32,
//   seg_meta [G, LM, 2] i32, seg_scalings [G, LM] f32, lm in [0, LM), seg_indptr [G+1] i32:
//
//     for g: (off, r) = seg_meta[g, lm]; rows = seg_indptr[g] .. seg_indptr[g+1]-1
//       A[k, :] = concat(arena[page_index[off + k*ca + c]] for c < ca)[:d_in]
//       Bt[k, :] = concat(arena[page_index[off + r*ca + k*cb + c]] for c < cb)[:d_out]
//       y[rows] += seg_scalings[g, lm] * (x[rows] @ A.T) @ Bt          (fp32 accumulation)
//
// r = 0 (a base-only segment, or a module the adapter does not target) adds nothing. No compute and
// no bytes go to padding up to a maximum rank: the work of a segment is its own rank's.
//
// CPU: this file checks the arguments (every page id the call will read) and lists the segments; the
// two phases (shrink x @ A^T into an fp32 [T, r_max] buffer, then expand it @ B^T into y) run in
// lora_paged_tiles.h, compiled per instruction set and picked at run time (cpu_isa.cpp), over
// OpenMP threads: (segment, row block) items, each its shrink then its expand.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace {

// Every check that names an argument; also bounds every page id the call will read.
void check_lora_paged_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& arena,
                           const at::Tensor& page_index, const at::Tensor& seg_meta,
                           const at::Tensor& seg_scalings, int64_t lm, const at::Tensor& seg_indptr) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, d_in], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "x must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0),
              "y must be [T, d_out] with T = ", x.size(0), ", got shape ", y.sizes());
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(y.dtype() == x.dtype(), "y must have x's dtype ", x.dtype(), ", got ", y.dtype());
  TORCH_CHECK(arena.dim() == 2 && arena.is_contiguous(),
              "arena must be a contiguous [num_pages, page_elems] tensor, got shape ", arena.sizes());
  TORCH_CHECK(arena.dtype() == x.dtype() || (dtype == at::kFloat && arena.scalar_type() == at::kBFloat16),
              "arena must have x's dtype ", x.dtype(), " (or bfloat16 pages under float32 x), got ",
              arena.dtype());
  TORCH_CHECK(page_index.dim() == 1 && page_index.scalar_type() == at::kInt && page_index.is_contiguous(),
              "page_index must be a contiguous 1-D int32 tensor, got ", page_index.scalar_type(), " ",
              page_index.sizes());
  TORCH_CHECK(seg_indptr.dim() == 1 && seg_indptr.scalar_type() == at::kInt && seg_indptr.size(0) >= 1 &&
                  seg_indptr.is_contiguous(),
              "seg_indptr must be a contiguous [G+1] int32 tensor, got ", seg_indptr.scalar_type(), " ", seg_indptr.sizes());
  const int64_t G = seg_indptr.size(0) - 1;
  TORCH_CHECK(seg_meta.dim() == 3 && seg_meta.size(0) == G && seg_meta.size(2) == 2 &&
                  seg_meta.scalar_type() == at::kInt && seg_meta.is_contiguous(),
              "seg_meta must be a contiguous [G, LM, 2] int32 tensor with G = ", G, ", got ",
              seg_meta.scalar_type(), " ", seg_meta.sizes());
  TORCH_CHECK(seg_scalings.dim() == 2 && seg_scalings.size(0) == G &&
                  seg_scalings.size(1) == seg_meta.size(1) && seg_scalings.scalar_type() == at::kFloat &&
                  seg_scalings.is_contiguous(),
              "seg_scalings must be a contiguous [G, LM] float32 tensor = [", G, ", ", seg_meta.size(1),
              "], got ", seg_scalings.scalar_type(), " ", seg_scalings.sizes());
  TORCH_CHECK(0 <= lm && lm < seg_meta.size(1), "lm = ", lm, " is out of range [0, LM = ",
              seg_meta.size(1), ")");
  for (const auto* t : {&x, &arena, &page_index, &seg_meta, &seg_scalings, &seg_indptr}) {
    TORCH_CHECK(t->device() == y.device(), "every tensor must be on y's device ", y.device());
  }
  TORCH_CHECK(y.device().is_cpu(), "lora_paged_add_ runs on CPU tensors (the arena is host memory)");
  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  TORCH_CHECK(ip[0] == 0, "seg_indptr must start at 0, got ", ip[0]);
  TORCH_CHECK(ip[G] == x.size(0), "seg_indptr must end at T = ", x.size(0), ", got ", ip[G]);
  const int64_t P = arena.size(1), NP = arena.size(0), E = page_index.size(0);
  const int64_t ca = (x.size(1) + P - 1) / std::max<int64_t>(P, 1);
  const int64_t cb = (y.size(1) + P - 1) / std::max<int64_t>(P, 1);
  const int32_t* meta = seg_meta.data_ptr<int32_t>();
  const int32_t* pages = page_index.data_ptr<int32_t>();
  const int64_t LM = seg_meta.size(1);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(ip[g + 1] >= ip[g], "seg_indptr must be non-decreasing, got seg_indptr[", g, "] = ",
                ip[g], " > seg_indptr[", g + 1, "] = ", ip[g + 1]);
    const int64_t off = meta[(g * LM + lm) * 2], r = meta[(g * LM + lm) * 2 + 1];
    TORCH_CHECK(r >= 0, "seg_meta[", g, ", ", lm, "] has rank ", r, " < 0");
    if (r == 0) continue;
    TORCH_CHECK(P > 0, "arena must have page_elems > 0");
    const int64_t n = r * (ca + cb);
    TORCH_CHECK(off >= 0 && off + n <= E, "seg_meta[", g, ", ", lm, "] = (", off, ", ", r,
                ") reads page_index[", off, ":", off + n, "], past its length ", E);
    for (int64_t i = off; i < off + n; ++i) {
      TORCH_CHECK(0 <= pages[i] && pages[i] < NP, "page_index[", i, "] = ", pages[i],
                  " is out of range [0, num_pages = ", NP, ")");
    }
  }
}

// float64 (accumulated in float64) and float16 (in fp32): plain loops, one token at a time. The served
// dtypes, float32 and bfloat16, run the per-ISA tiles (lora_paged_tiles.h).
template <typename scalar_t, typename acc_t>
void paged_scalar(scalar_t* y, const scalar_t* x, const scalar_t* arena, const std::vector<openlora::PagedSegment>& segs,
                  int64_t d_in, int64_t d_out, int64_t P, int64_t ca, int64_t cb) {
  std::vector<acc_t> t;
  for (const auto& s : segs) {
    t.assign(static_cast<size_t>(s.rank), acc_t(0));
    for (int64_t i = s.row0; i < s.row0 + s.rows; ++i) {
      for (int64_t k = 0; k < s.rank; ++k) {
        acc_t sum = 0;
        for (int64_t c = 0; c < ca; ++c) {
          const scalar_t* a = arena + static_cast<int64_t>(s.a_pages[k * ca + c]) * P;
          for (int64_t j = 0, n = std::min(P, d_in - c * P); j < n; ++j)
            sum += static_cast<acc_t>(x[i * d_in + c * P + j]) * static_cast<acc_t>(a[j]);
        }
        t[k] = static_cast<acc_t>(s.scaling) * sum;
      }
      for (int64_t c = 0; c < cb; ++c) {
        for (int64_t j = 0, n = std::min(P, d_out - c * P); j < n; ++j) {
          acc_t sum = 0;
          for (int64_t k = 0; k < s.rank; ++k)
            sum += t[k] * static_cast<acc_t>(arena[static_cast<int64_t>(s.b_pages[k * cb + c]) * P + j]);
          scalar_t& out = y[i * d_out + c * P + j];
          out = static_cast<scalar_t>(static_cast<acc_t>(out) + sum);
        }
      }
    }
  }
}

// Multiply-adds below which a call runs on the calling thread (a parallel region costs more).
constexpr int64_t kMinParallelWork = 1 << 16;

void lora_paged_add_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& arena,
                        const at::Tensor& page_index, const at::Tensor& seg_meta,
                        const at::Tensor& seg_scalings, int64_t lm, const at::Tensor& seg_indptr) {
  check_lora_paged_args(y, x, arena, page_index, seg_meta, seg_scalings, lm, seg_indptr);
  const int64_t G = seg_indptr.size(0) - 1, LM = seg_meta.size(1);
  const int64_t T = x.size(0), d_in = x.size(1), d_out = y.size(1), P = arena.size(1);
  if (P == 0 || d_in == 0 || d_out == 0) return;
  const int64_t ca = (d_in + P - 1) / P, cb = (d_out + P - 1) / P;
  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  const int32_t* meta = seg_meta.data_ptr<int32_t>();
  const float* scal = seg_scalings.data_ptr<float>();
  const int32_t* pages = page_index.data_ptr<int32_t>();
  std::vector<openlora::PagedSegment> segs;
  int64_t r_max = 0, work = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t off = meta[(g * LM + lm) * 2], r = meta[(g * LM + lm) * 2 + 1], rows = ip[g + 1] - ip[g];
    if (r == 0 || rows == 0) continue;
    segs.push_back({ip[g], rows, r, scal[g * LM + lm], pages + off, pages + off + r * ca});
    r_max = std::max(r_max, r);
    work += rows * r * (d_in + d_out);
  }
  if (segs.empty()) return;
  const auto dtype = x.scalar_type();
  if (dtype == at::kFloat || dtype == at::kBFloat16) {
    std::vector<float> t(static_cast<size_t>(T * r_max));
    const int threads = at::in_parallel_region() || work < kMinParallelWork ? 1 : std::max(1, at::get_num_threads());
    const openlora::PagedCall call{x.data_ptr(), y.data_ptr(), arena.data_ptr(), d_in, d_out, P, ca, cb, r_max,
                                   segs.data(), static_cast<int64_t>(segs.size()), t.data(), threads};
    const auto& kernels = openlora::cpu_ops();
    if (dtype == at::kBFloat16) kernels.paged_bf16(call);
    else if (arena.scalar_type() == at::kBFloat16) kernels.paged_f32_bf16(call);   // --lora-dtype bfloat16
    else kernels.paged_f32(call);
  } else if (dtype == at::kDouble) {
    paged_scalar<double, double>(y.data_ptr<double>(), x.data_ptr<double>(), arena.data_ptr<double>(), segs,
                                 d_in, d_out, P, ca, cb);
  } else {
    TORCH_CHECK(dtype == at::kHalf, "x must be float32, bfloat16, float16 or float64, got ", dtype);
    paged_scalar<at::Half, float>(y.data_ptr<at::Half>(), x.data_ptr<at::Half>(), arena.data_ptr<at::Half>(),
                                  segs, d_in, d_out, P, ca, cb);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("lora_paged_add_", &lora_paged_add_cpu);
}
