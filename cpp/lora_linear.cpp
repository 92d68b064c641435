// openlora::lora_linear: a linear layer plus one LoRA adapter per segment of tokens.
//
//   y = x @ weight.T + bias                                   # [T, d_out], at::addmm
//   for g in range(G):                                         # segments of x's rows
//     s = seg_slots[g]; r = ranks[s]; rows = seg_indptr[g] : seg_indptr[g+1]
//     if s >= 0 and r > 0:
//       y[rows] += scalings[s] * (x[rows] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
//
// CPU kernel: the base matmul writes y; the LoRA update is accumulated into y in place, each segment at
// its own rank. Short segments (decode) go through hand-written loops parallel over tokens (shrink) and
// over d_out (expand); long segments (prefill) through two BLAS calls each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "lora_linear_checks.h"

namespace openlora {
namespace {

// Segments with fewer tokens than this use the hand-written loops; longer ones use BLAS.
constexpr int64_t kShortSegment = 8;

struct Segment {
  int64_t begin, end, slot, rank;
  float scaling;
};

// sum_i a[i] * b[i], accumulated in fp32.
template <typename scalar_t>
inline float dot(const scalar_t* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(a[i]) * b[i];
  return sum;
}

// Short segments. v: [T, r_max] fp32 scratch, rows of short segments' tokens only.
//   shrink: v[t, :r] = scaling * x[t] @ lora_a[s, :r].T       (parallel over segments)
//   expand: y[t, o] += v[t, :r] @ lora_b[s, o, :r]             (parallel over o)
template <typename scalar_t>
void lora_short_segments(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const std::vector<Segment>& segs, at::Tensor& y) {
  const int64_t d_in = x.size(1), d_out = y.size(1), r_max = lora_a.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = lora_a.data_ptr<scalar_t>();
  const scalar_t* bp = lora_b.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  std::vector<float> v(x.size(0) * r_max);
  float* vp = v.data();

  at::parallel_for(0, segs.size(), 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> xf(std::is_same_v<scalar_t, float> ? 0 : d_in);  // x row in fp32
    for (int64_t g = g0; g < g1; ++g) {
      const Segment& seg = segs[g];
      const scalar_t* a = ap + seg.slot * r_max * d_in;  // [r_max, d_in]
      for (int64_t t = seg.begin; t < seg.end; ++t) {
        const float* xt;
        if constexpr (std::is_same_v<scalar_t, float>) {
          xt = xp + t * d_in;
        } else {
          for (int64_t i = 0; i < d_in; ++i) xf[i] = static_cast<float>(xp[t * d_in + i]);
          xt = xf.data();
        }
        for (int64_t k = 0; k < seg.rank; ++k) {
          vp[t * r_max + k] = seg.scaling * dot(a + k * d_in, xt, d_in);
        }
      }
    }
  });

  at::parallel_for(0, d_out, 128, [&](int64_t o0, int64_t o1) {
    for (const Segment& seg : segs) {
      const scalar_t* b = bp + seg.slot * d_out * r_max;  // [d_out, r_max]
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t t = seg.begin; t < seg.end; ++t) {
          scalar_t& out = yp[t * d_out + o];
          out = static_cast<float>(out) + dot(b + o * r_max, vp + t * r_max, seg.rank);
        }
      }
    }
  });
}

// Long segments: two BLAS calls each, in fp32 for reduced-precision dtypes.
//   y[rows] += scaling * (x[rows] @ A.T) @ B.T,  A = lora_a[s, :r] [r, d_in], B = lora_b[s, :, :r]
void lora_long_segment(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const Segment& seg, at::Tensor& y) {
  auto xs = x.slice(0, seg.begin, seg.end);  // [n, d_in]
  auto ys = y.slice(0, seg.begin, seg.end);  // [n, d_out], contiguous rows of y
  auto a = lora_a.select(0, seg.slot).narrow(0, 0, seg.rank);   // [r, d_in]
  auto b = lora_b.select(0, seg.slot).narrow(1, 0, seg.rank);   // [d_out, r]
  if (x.scalar_type() == at::kFloat) {
    ys.addmm_(at::mm(xs, a.t()), b.t(), /*beta=*/1, /*alpha=*/seg.scaling);
  } else {
    auto v = at::mm(xs.to(at::kFloat), a.to(at::kFloat).t());  // [n, r]
    ys.add_(at::mm(v, b.to(at::kFloat).t()), seg.scaling);
  }
}

at::Tensor lora_linear_cpu(const at::Tensor& x_, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a_,
                           const at::Tensor& lora_b_, const at::Tensor& scalings_,
                           const at::Tensor& ranks_, const at::Tensor& seg_indptr_,
                           const at::Tensor& seg_slots_) {
  check_lora_linear_args(x_, weight, bias, lora_a_, lora_b_, scalings_, ranks_, seg_indptr_,
                         seg_slots_);
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16 on CPU, got ", x_.scalar_type());
  auto x = x_.contiguous();
  auto lora_a = lora_a_.contiguous();
  auto lora_b = lora_b_.contiguous();
  auto ranks = ranks_.contiguous();
  auto seg_indptr = seg_indptr_.contiguous();
  auto seg_slots = seg_slots_.contiguous();
  auto scalings = scalings_.contiguous();
  const int64_t T = x.size(0), r_max = lora_a.size(1);
  check_lora_linear_values(ranks, seg_indptr, seg_slots, T, r_max);

  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, weight.t())
                                                      : at::mm(x, weight.t());  // [T, d_out]

  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  const int32_t* sl = seg_slots.data_ptr<int32_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const float* sc = scalings.data_ptr<float>();
  std::vector<Segment> short_segs;
  for (int64_t g = 0; g < seg_slots.size(0); ++g) {
    const int64_t s = sl[g];
    if (s < 0 || rk[s] == 0 || ip[g + 1] == ip[g]) continue;
    Segment seg{ip[g], ip[g + 1], s, rk[s], sc[s]};
    if (seg.end - seg.begin < kShortSegment) {
      short_segs.push_back(seg);
    } else {
      lora_long_segment(x, lora_a, lora_b, seg, y);
    }
  }
  if (!short_segs.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_linear_cpu", [&] {
      lora_short_segments<scalar_t>(x, lora_a, lora_b, short_segs, y);
    });
  }
  return y;
}

}  // namespace

// The schema, declared once; each backend registers its kernel with TORCH_LIBRARY_IMPL.
TORCH_LIBRARY(openlora, m) {
  // y = x @ weight.T + bias, plus scalings[s] * (x @ lora_a[s,:r].T) @ lora_b[s,:,:r].T per segment.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scalings, Tensor ranks, Tensor seg_indptr, Tensor seg_slots) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlora, CPU, m) { m.impl("lora_linear", &lora_linear_cpu); }

}  // namespace openlora
