// openlora::lora_linear: a linear layer plus one LoRA adapter per segment of tokens.
//
//   y = x @ weight.T + bias                                   # [T, d_out]
//   for g in range(G):                                         # segments of x's rows
//     s = seg_slots[g]; r = ranks[s]; rows = seg_indptr[g] : seg_indptr[g+1]
//     if s >= 0 and r > 0:
//       y[rows] += scalings[s] * (x[rows] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
//
// CPU kernel: the base matmul writes y, then the LoRA update is accumulated into y in place, each
// segment at its own rank, in one parallel region with two phases, each cut into runs of equal cost:
//   shrink  v[t, :r] = scaling * x[t] @ lora_a[s, :r].T     runs of token groups (<= 4 tokens)
//   (barrier)
//   expand  y[t, o] += v[t, :r] @ lora_b[s, o, :r]           runs of (segment, 16 rows of y), so each
//                                                           thread streams stretches of lora_b in order
// fp32 with AVX-512, or AVX2 + FMA at half the width, uses register-tiled loops for both; so does
// bf16 with AVX512_BF16 (shrink with _mm512_dpbf16_ps, expand with lora_b widened to fp32 in
// registers, fp32 accumulation, y rounded once to bf16). Other dtypes/ISAs use plain fp32-accumulating
// loops for short segments and BLAS (in fp32) for long ones.
// fp32 calls of up to kInterleaveMaxTokens tokens (decode and short prefill) do not run the base
// matmul first: it is cut into column blocks of single-threaded sgemm calls interleaved with the
// two LoRA phases (lora_linear_interleaved), so streaming the adapters overlaps the matmul's compute.
// That is the default on CPUs without AVX-512 (where it measured faster); set_interleave (the
// executor's --cpu-interleave) forces it on or off (cpu_isa.cpp).
// lora_b may be stored transposed (the [S, d_out, r_max] view of [S, r_max, d_out] memory, as the
// executor's CPU adapter pool keeps it): it is then read in place, and the expand streams rows of
// lora_b^T straight through the register tiles (expand_segment_t), with no gathers or lane sums.
//
// The files: this driver (checks, the base matmul, dispatch; lora_linear_cpu.h what it shares), the
// LoRA phases in lora_tiles.h compiled once per instruction set (lora_linear_{avx512_bf16,avx512,
// avx2,generic}.cpp, each with its own flags; cpu_isa.cpp picks one at run time) and the
// packed-GEMM path (lora_linear_packed.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "lora_linear_checks.h"
#include "lora_linear_cpu.h"
#include "lora_linear_packed.h"

namespace openlora {
namespace {

constexpr int64_t kLongSegment = 8;  // tokens from which a segment is "long" (untiled paths: BLAS)

// The threads to use here: 1 inside another parallel region.
inline int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

LoraCall lora_call(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, bool b_t,
                   const std::vector<Segment>& segs, at::Tensor& y) {
  return {x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), y.data_ptr(), x.size(0), x.size(1),
          y.size(1), lora_a.size(1), b_t, segs.data(), static_cast<int64_t>(segs.size()), num_threads()};
}

// One long segment through BLAS, in fp32: y[rows] += scaling * (x[rows] @ A.T) @ B.T,
// A = lora_a[s, :r] [r, d_in], B = lora_b[s, :, :r] [d_out, r].
void lora_segment_blas(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const Segment& seg, at::Tensor& y) {
  auto xs = x.slice(0, seg.begin, seg.end).to(at::kFloat);          // [n, d_in]
  auto a = lora_a.select(0, seg.slot).narrow(0, 0, seg.rank).to(at::kFloat);  // [r, d_in]
  auto b = lora_b.select(0, seg.slot).narrow(1, 0, seg.rank).to(at::kFloat);  // [d_out, r]
  y.slice(0, seg.begin, seg.end).add_(at::mm(at::mm(xs, a.t()), b.t()), seg.scaling);
}

// lora_linear (packed == nullptr) and lora_linear_packed.
at::Tensor lora_linear_impl(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor* packed,
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
  // lora_b stored transposed (a [S, r_max, d_out] tensor's .transpose(1, 2), as the executor's CPU
  // adapter pool keeps it) is read in place: its expand needs neither gathers nor lane sums.
  const bool b_t = !lora_b_.is_contiguous() && lora_b_.transpose(1, 2).is_contiguous();
  auto lora_b = b_t ? lora_b_ : lora_b_.contiguous();
  auto ranks = ranks_.contiguous();
  auto seg_indptr = seg_indptr_.contiguous();
  auto seg_slots = seg_slots_.contiguous();
  auto scalings = scalings_.contiguous();
  check_lora_linear_values(ranks, seg_indptr, seg_slots, x.size(0), lora_a.size(1));

  const int32_t* ip = seg_indptr.data_ptr<int32_t>();
  const int32_t* sl = seg_slots.data_ptr<int32_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const float* sc = scalings.data_ptr<float>();
  const IsaKernels& kernels = cpu_kernels();
  const bool tiled = (kernels.tiled_float && x.scalar_type() == at::kFloat) ||
                     (kernels.tiled_bfloat16 && x.scalar_type() == at::kBFloat16);
  std::vector<Segment> segs;  // the segments with an adapter to add
  for (int64_t g = 0; g < seg_slots.size(0); ++g) {
    const int64_t s = sl[g];
    if (s >= 0 && rk[s] > 0 && ip[g + 1] > ip[g]) segs.push_back({ip[g], ip[g + 1], s, rk[s], sc[s]});
  }
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y;
  if (packed != nullptr) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "lora_linear_packed takes float32 x, got ", x.scalar_type());
    y = packed_matmul(x, weight, packed_data(*packed, weight), bias);
  } else if (x.scalar_type() == at::kFloat && x.size(0) <= kInterleaveMaxTokens && sgemm_ != nullptr &&
             x.size(0) > 0 && interleave_enabled()) {
    auto w = weight.contiguous();
    auto b = has_bias ? bias->contiguous() : at::Tensor();
    y = at::empty({x.size(0), weight.size(0)}, x.options());
    kernels.interleaved(lora_call(x, lora_a, lora_b, b_t, segs, y), w.data_ptr<float>(),
                        has_bias ? b.data_ptr<float>() : nullptr);
    return y;
  } else {
    y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());  // [T, d_out]
  }
  if (!tiled) {  // long segments through BLAS, the rest through the loops
    auto is_long = [](const Segment& seg) { return seg.end - seg.begin >= kLongSegment; };
    for (const Segment& seg : segs)
      if (is_long(seg)) lora_segment_blas(x, lora_a, lora_b, seg, y);
    segs.erase(std::remove_if(segs.begin(), segs.end(), is_long), segs.end());
  }
  if (!segs.empty()) {
    const LoraCall call = lora_call(x, lora_a, lora_b, b_t, segs, y);
    if (x.scalar_type() == at::kFloat)
      kernels.segments_f32(call);
    else
      kernels.segments_bf16(call);
  }
  return y;
}

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, const at::Tensor& scalings,
                           const at::Tensor& ranks, const at::Tensor& seg_indptr,
                           const at::Tensor& seg_slots) {
  return lora_linear_impl(x, weight, nullptr, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots);
}

at::Tensor lora_linear_packed_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& packed_weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                  const at::Tensor& scalings, const at::Tensor& ranks,
                                  const at::Tensor& seg_indptr, const at::Tensor& seg_slots) {
  return lora_linear_impl(x, weight, &packed_weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr,
                          seg_slots);
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_async", &lora_linear_cpu);
  m.impl("lora_linear_packed", &lora_linear_packed_cpu);
}

}  // namespace openlora
