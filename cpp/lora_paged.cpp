// openlora::lora_paged_add_ : each segment's LoRA delta read in place from the paged adapter arena.
//
// The arena holds every host-resident adapter at its true rank in fixed-size pages of P elements
// (services/executor/adapters/arena.py). One (layer, module) of an adapter of rank r over a
// projection [d_out, d_in] takes r * ca pages for A (ca = ceil(d_in / P): row k of lora_A is pages
// k*ca .. k*ca+ca-1, the last one partly used) and r * cb pages for B^T (cb = ceil(d_out / P): row k
// of lora_B.T, i.e. column k of lora_B). page_index lists those pages; seg_meta[g, lm] = (offset of
// the (layer, module)'s first A page id in page_index, r), followed by its r*cb B^T page ids.
//
//   y [T, d_out] (updated in place), x [T, d_in], arena [NP, P] (x's dtype), page_index [E] i32,
//   seg_meta [G, LM, 2] i32, seg_scalings [G, LM] f32, lm in [0, LM), seg_indptr [G+1] i32:
//
//     for g: (off, r) = seg_meta[g, lm]; rows = seg_indptr[g] .. seg_indptr[g+1]-1
//       A[k, :] = concat(arena[page_index[off + k*ca + c]] for c < ca)[:d_in]
//       Bt[k, :] = concat(arena[page_index[off + r*ca + k*cb + c]] for c < cb)[:d_out]
//       y[rows] += seg_scalings[g, lm] * (x[rows] @ A.T) @ Bt          (fp32 accumulation)
//
// r = 0 (a base-only segment, or a module the adapter does not target) adds nothing. No compute and
// no bytes go to padding up to a maximum rank: the work of a segment is its own rank's.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// Every check that names an argument; also bounds every page id the call will read.
void check_lora_paged_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& arena,
                           const at::Tensor& page_index, const at::Tensor& seg_meta,
                           const at::Tensor& seg_scalings, int64_t lm, const at::Tensor& seg_indptr) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, d_in], got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0),
              "y must be [T, d_out] with T = ", x.size(0), ", got shape ", y.sizes());
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(y.dtype() == x.dtype(), "y must have x's dtype ", x.dtype(), ", got ", y.dtype());
  TORCH_CHECK(arena.dim() == 2 && arena.is_contiguous(),
              "arena must be a contiguous [num_pages, page_elems] tensor, got shape ", arena.sizes());
  TORCH_CHECK(arena.dtype() == x.dtype(), "arena must have x's dtype ", x.dtype(), ", got ",
              arena.dtype());
  TORCH_CHECK(page_index.dim() == 1 && page_index.scalar_type() == at::kInt && page_index.is_contiguous(),
              "page_index must be a contiguous 1-D int32 tensor, got ", page_index.scalar_type(), " ",
              page_index.sizes());
  TORCH_CHECK(seg_indptr.dim() == 1 && seg_indptr.scalar_type() == at::kInt && seg_indptr.size(0) >= 1,
              "seg_indptr must be [G+1] int32, got ", seg_indptr.scalar_type(), " ", seg_indptr.sizes());
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

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// Work item: up to kTile tokens of one segment. shrink t[i, k] = x[i] . A[k]; then
// y[i, :] += sum_k (s * t[i, k]) * Bt[k, :], one P-chunk of y at a time in an fp32 buffer.
constexpr int64_t kTile = 16;
// Segments of at least this many tokens go through two GEMMs on the gathered weights.
constexpr int64_t kGemmRows = 32;

template <typename scalar_t>
void paged_tile(scalar_t* y, const scalar_t* x, const scalar_t* arena, const int32_t* A_pages,
                const int32_t* B_pages, int64_t r, float scaling, int64_t row0, int64_t m, int64_t d_in,
                int64_t d_out, int64_t P, int64_t ca, int64_t cb) {
  std::vector<float> t(static_cast<size_t>(m * r), 0.f);
  std::vector<float> xf(static_cast<size_t>(m * d_in));
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* xi = x + (row0 + i) * d_in;
    float* xo = xf.data() + i * d_in;
#pragma omp simd
    for (int64_t j = 0; j < d_in; ++j) xo[j] = to_f(xi[j]);
  }
  for (int64_t k = 0; k < r; ++k) {
    for (int64_t c = 0; c < ca; ++c) {
      const scalar_t* a = arena + static_cast<int64_t>(A_pages[k * ca + c]) * P;
      const int64_t lo = c * P, len = std::min(P, d_in - lo);
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = xf.data() + i * d_in + lo;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < len; ++j) acc += xi[j] * to_f(a[j]);
        t[i * r + k] += acc;
      }
    }
  }
  for (auto& v : t) v *= scaling;
  std::vector<float> acc(static_cast<size_t>(P));
  for (int64_t i = 0; i < m; ++i) {
    scalar_t* yi = y + (row0 + i) * d_out;
    const float* ti = t.data() + i * r;
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t lo = c * P, len = std::min(P, d_out - lo);
      std::fill(acc.begin(), acc.begin() + len, 0.f);
      for (int64_t k = 0; k < r; ++k) {
        const scalar_t* b = arena + static_cast<int64_t>(B_pages[k * cb + c]) * P;
        const float coef = ti[k];
        float* ac = acc.data();
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) ac[j] += coef * to_f(b[j]);
      }
      scalar_t* yo = yi + lo;
      const float* ac = acc.data();
      for (int64_t j = 0; j < len; ++j) yo[j] = static_cast<scalar_t>(to_f(yo[j]) + ac[j]);
    }
  }
}

void lora_paged_add_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& arena,
                        const at::Tensor& page_index, const at::Tensor& seg_meta,
                        const at::Tensor& seg_scalings, int64_t lm, const at::Tensor& seg_indptr) {
  check_lora_paged_args(y, x, arena, page_index, seg_meta, seg_scalings, lm, seg_indptr);
  const int64_t G = seg_indptr.size(0) - 1, LM = seg_meta.size(1);
  const int64_t d_in = x.size(1), d_out = y.size(1), P = arena.size(1);
  if (P == 0) return;
  const int64_t ca = (d_in + P - 1) / P, cb = (d_out + P - 1) / P;
  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  const int32_t* meta = seg_meta.data_ptr<int32_t>();
  const float* scal = seg_scalings.data_ptr<float>();
  const int32_t* pages = page_index.data_ptr<int32_t>();
  struct Item { int64_t g, row0, m; };
  std::vector<Item> items;
  std::vector<int64_t> long_segs;
  for (int64_t g = 0; g < G; ++g) {
    if (meta[(g * LM + lm) * 2 + 1] == 0 || ip[g + 1] == ip[g]) continue;
    if (ip[g + 1] - ip[g] >= kGemmRows) {
      long_segs.push_back(g);
      continue;
    }
    for (int64_t row = ip[g]; row < ip[g + 1]; row += kTile) {
      items.push_back({g, row, std::min<int64_t>(kTile, ip[g + 1] - row)});
    }
  }
  // long segments (prefill): gather A and B^T out of the pages once (r * (d_in + d_out) elements,
  // small next to the segment's m * r * (d_in + d_out) multiply-adds) and run two GEMMs
  for (int64_t g : long_segs) {
    const int64_t off = meta[(g * LM + lm) * 2], r = meta[(g * LM + lm) * 2 + 1];
    auto idx = page_index.narrow(0, off, r * (ca + cb)).to(at::kLong);
    auto a = arena.index_select(0, idx.narrow(0, 0, r * ca)).view({r, ca * P}).narrow(1, 0, d_in);
    auto bt = arena.index_select(0, idx.narrow(0, r * ca, r * cb)).view({r, cb * P}).narrow(1, 0, d_out);
    const auto rows = y.narrow(0, ip[g], ip[g + 1] - ip[g]);
    const auto xs = x.narrow(0, ip[g], ip[g + 1] - ip[g]);
    if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
      rows.addmm_(at::mm(xs, a.t()), bt, 1.0, scal[g * LM + lm]);
    } else {   // fp32 accumulation, one rounding, as the short path does
      auto t = at::mm(xs.to(at::kFloat), a.t().to(at::kFloat));
      rows.copy_(rows.to(at::kFloat).addmm_(t, bt.to(at::kFloat), 1.0, scal[g * LM + lm]));
    }
  }
  if (items.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_paged_add_", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = arena.data_ptr<scalar_t>();
    // small work (a decode step) runs on the calling thread: a parallel region costs more than it saves
    const int64_t work = static_cast<int64_t>(items.size());
    at::parallel_for(0, work, work >= 4 ? 1 : work, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Item& it = items[w];
        const int64_t off = meta[(it.g * LM + lm) * 2], r = meta[(it.g * LM + lm) * 2 + 1];
        paged_tile<scalar_t>(yp, xp, ap, pages + off, pages + off + r * ca, r, scal[it.g * LM + lm],
                             it.row0, it.m, d_in, d_out, P, ca, cb);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("lora_paged_add_", &lora_paged_add_cpu);
}
