// Prepacked base weights (fp32, MKL): pack_weight and linear_packed, the engine's base GEMM on CPU for
// float32 models (services/executor/model/quant.py: Prepacked). No ISA-specific code: MKL picks its own
// kernels at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstddef>

// MKL's packed GEMM. Weak: OpenBLAS builds of torch lack it; then packing_available() is false and the
// engine keeps F.linear. The enum arguments are passed as their int values: column-major 102, the A
// matrix 161, no transpose 111, transpose 112, packed 151.
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest) __attribute__((weak));
extern "C" void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                                    const float* a, int lda, const float* b, int ldb, float beta,
                                    float* c, int ldc) __attribute__((weak));

namespace openlora {

constexpr int kColMajor = 102, kAMatrix = 161, kNoTrans = 111, kTrans = 112, kPacked = 151;
constexpr int64_t kPackedMaxTokens = 320;  // longer calls use at::addmm on the plain weight

bool packing_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
         cblas_sgemm_compute != nullptr;
}

namespace {

// -- prepacked base weights (fp32, MKL) ------------------------------------------------------------
// pack_weight(weight) copies an fp32 weight once into MKL's internal GEMM layout (cblas_sgemm_pack);
// linear_packed then runs the base matmul of calls of up to kPackedMaxTokens
// tokens with cblas_sgemm_compute, which skips the copy of the weight that every sgemm call makes
// (MKL's scopy_right48: 13% of an fp32 decode step's time). Measured on the 2-core AVX-512 Xeon at
// T = 64: 1.23-1.49x faster than torch.mm at the engine's shapes (d 512..4096), equal at 300 tokens,
// ~5% slower at 2048 (so longer calls keep at::addmm on the plain weight).
// The buffer: a 64-byte header (kPackMagic, d_out, d_in, MKL's byte count, the buffer's own address,
// then the bits of 6 of the weight's elements spread over it), then MKL's data, so a buffer used with
// another weight (another shape, or other values at those elements) is refused instead of silently
// misread. A clone of the weight passes, as it should: the packing depends on its values, not on
// where they live. A copy of the buffer is refused: MKL's packed data is only valid at the address
// it was packed at (a moved copy crashed MKL with SIGFPE).
constexpr int64_t kPackHeaderBytes = 64;
constexpr int64_t kPackMagic = 0x314b504c4f;      // "OLPK1"
constexpr int64_t kPackHintTokens = 64;           // n given to MKL when packing (any n computes)

constexpr int kFingerprint = 6;  // weight elements whose bits the header keeps

// The bits of kFingerprint elements of a contiguous fp32 weight, first to last, evenly spread.
std::array<uint32_t, kFingerprint> fingerprint(const at::Tensor& weight) {
  const auto* w = reinterpret_cast<const uint32_t*>(weight.data_ptr<float>());
  const int64_t last = weight.numel() - 1;
  std::array<uint32_t, kFingerprint> out{};
  for (int i = 0; i < kFingerprint; ++i) out[i] = w[last * i / (kFingerprint - 1)];
  return out;
}

at::Tensor pack_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK(packing_available(),
              "pack_weight needs MKL's packed GEMM (cblas_sgemm_pack), which this torch build lacks; "
              "use the plain weight (F.linear) instead");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0,
              "weight must be a non-empty 2-D [d_out, d_in] tensor, got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32 to be packed, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous to be packed");
  TORCH_CHECK(weight.size(0) < INT32_MAX && weight.size(1) < INT32_MAX, "weight is too large to pack");
  const int n_out = static_cast<int>(weight.size(0)), n_in = static_cast<int>(weight.size(1));
  const size_t bytes = cblas_sgemm_pack_get_size(kAMatrix, n_out, kPackHintTokens, n_in);
  at::Tensor buf = at::empty({kPackHeaderBytes + static_cast<int64_t>(bytes)}, weight.options().dtype(at::kByte));
  int64_t* header = reinterpret_cast<int64_t*>(buf.data_ptr<uint8_t>());
  std::fill(header, header + kPackHeaderBytes / 8, 0);
  header[0] = kPackMagic;
  header[1] = n_out;
  header[2] = n_in;
  header[3] = static_cast<int64_t>(bytes);
  header[4] = reinterpret_cast<int64_t>(header);
  const auto fp = fingerprint(weight);
  std::copy(fp.begin(), fp.end(), reinterpret_cast<uint32_t*>(header + 5));
  // y.T (d_out x T, column-major) = op(A) @ x.T with A = weight read as column-major [d_in, d_out]
  // and op = transpose: A is what gets packed.
  cblas_sgemm_pack(kColMajor, kAMatrix, kTrans, n_out, kPackHintTokens, n_in, 1.f,
                   weight.data_ptr<float>(), n_in,
                   reinterpret_cast<float*>(buf.data_ptr<uint8_t>() + kPackHeaderBytes));
  return buf;
}

// The packed data of `packed` after checking it was made by pack_weight from this very weight.
const float* packed_data(const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() > kPackHeaderBytes,
              "packed_weight must be the uint8 CPU tensor pack_weight returns, got ", packed.scalar_type(),
              " of shape ", packed.sizes(), " on ", packed.device());
  const int64_t* header = reinterpret_cast<const int64_t*>(packed.data_ptr<uint8_t>());
  TORCH_CHECK(header[0] == kPackMagic && header[3] + kPackHeaderBytes == packed.numel(),
              "packed_weight was not made by pack_weight");
  TORCH_CHECK(header[4] == reinterpret_cast<int64_t>(header),
              "packed_weight is a copy of a packed buffer: MKL's packed data is only valid where it "
              "was made; pack the weight again with pack_weight(weight)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be the contiguous float32 tensor that was packed");
  const auto fp = fingerprint(weight);
  TORCH_CHECK(header[1] == weight.size(0) && header[2] == weight.size(1) &&
                  std::equal(fp.begin(), fp.end(), reinterpret_cast<const uint32_t*>(header + 5)),
              "packed_weight was packed from another weight (", header[1], " x ", header[2],
              "); pack this weight with pack_weight(weight)");
  return reinterpret_cast<const float*>(packed.data_ptr<uint8_t>() + kPackHeaderBytes);
}

// y = x @ weight.T + bias (x: fp32 [T, d_in] contiguous) through pw, weight's packed data, for
// calls of up to kPackedMaxTokens tokens; longer ones run at::addmm on the plain weight.
at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& weight, const float* pw,
                         const c10::optional<at::Tensor>& bias_) {
  const bool has_bias = bias_.has_value() && bias_->defined();
  if (x.size(0) > kPackedMaxTokens) return has_bias ? at::addmm(*bias_, x, weight.t()) : at::mm(x, weight.t());
  const auto b = has_bias ? bias_->contiguous() : at::Tensor();
  const float* bias = has_bias ? b.data_ptr<float>() : nullptr;
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  at::Tensor y = at::empty({T, d_out}, x.options());
  if (T == 0) return y;
  float* yp = y.data_ptr<float>();
  if (bias != nullptr)
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) std::copy(bias, bias + d_out, yp + t * d_out);
    });
  cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, static_cast<int>(d_out), static_cast<int>(T),
                      static_cast<int>(d_in), pw, static_cast<int>(d_in), x.data_ptr<float>(),
                      static_cast<int>(d_in), bias != nullptr ? 1.f : 0.f, yp, static_cast<int>(d_out));
  return y;
}

// A linear layer through a packed weight: the engine's base GEMM and lm_head.
at::Tensor linear_packed_cpu(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& packed_weight,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "x must be a 2-D float32 CPU tensor, got ", x_.scalar_type(), " of shape ", x_.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_.size(1) && weight.scalar_type() == at::kFloat,
              "weight must be float32 [d_out, d_in] with d_in = ", x_.size(1), ", got shape ", weight.sizes());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat,
                "bias must be float32 [d_out] with d_out = ", weight.size(0), ", got shape ", bias->sizes());
  return packed_matmul(x_.contiguous(), weight, packed_data(packed_weight, weight), bias);
}


}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("linear_packed", &linear_packed_cpu);
  m.impl("pack_weight", &pack_weight_cpu);
}

}  // namespace openlora
