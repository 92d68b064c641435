// Every schema of the openlora operator library, declared once, here. The kernels register in their
// own files with TORCH_LIBRARY_IMPL (cpp/*.cpp for CPU, cpp/cuda/*.cu for CUDA); Python's
// services.executor.ops reads its SCHEMAS (for the reference fallback) from this file, and
// tests/test_ops_schemas.py checks them against torch.ops.openlora.<op>._schema.
// One m.def per op, each after a comment saying what it computes.
#include <torch/library.h>

#include "cpu_isa.h"

namespace openlora {

bool packing_available();  // linear_packed.cpp

TORCH_LIBRARY(openlora, m) {
  // x @ weight.T + bias through pack_weight(weight) (CPU, float32, MKL): the base GEMM and the lm_head.
  m.def("linear_packed(Tensor x, Tensor weight, Tensor packed_weight, Tensor? bias) -> Tensor");
  // weight copied once into MKL's GEMM layout, behind a header that ties it to this weight.
  m.def("pack_weight(Tensor weight) -> Tensor");
  // whether this torch's BLAS has MKL's packed GEMM (pack_weight works).
  m.def("packing_available() -> bool", &packing_available);
  // out[n, h] = softmax(scale * q[n, h] @ K_n.T) @ V_n over n's last context_lens[n] (or window) keys.
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window) -> Tensor");
  // paged_attention_decode for index values right by construction: on CUDA no host copy (no sync),
  // the values bounded on the device instead of checked; on CPU it is paged_attention_decode.
  m.def(
      "paged_attention_decode_async(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window) -> Tensor");
  // y[seg] += scaling * (x[seg] @ A.T) @ Bt, each segment's A and B^T read in place from arena pages.
  m.def(
      "lora_paged_add_(Tensor(a!) y, Tensor x, Tensor arena, Tensor page_index, Tensor seg_meta, "
      "Tensor seg_scalings, int lm, Tensor seg_indptr) -> ()");
  // weight * (x * rsqrt(mean(x^2, -1) + eps)), the norm in fp32.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // (rms_norm(x + residual), x + residual): a residual add and the next norm in one pass.
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // silu(gate) * up.
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // x * cos + rotate_half(x) * sin (Hugging Face's RoPE).
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  // logits with -inf where bit t of words[j] is clear, in each row rows[j] (structured outputs' token
  // masks; CPU only: other devices run the reference).
  m.def("token_bitmask_fill(Tensor logits, Tensor words, Tensor rows) -> Tensor");
  // t[rows[j], tok] = value in place wherever bit tok of words[j] is clear, nothing else touched (the
  // sampler zeroes a grammar row's forbidden tokens in its softmax; CPU only: elsewhere the reference).
  m.def("token_bitmask_fill_(Tensor(a!) t, Tensor words, Tensor rows, float value) -> ()");
  // the CPU kernels' instruction set in use: "avx512_bf16", "avx512", "avx2" or "generic".
  m.def("cpu_isa() -> str", &cpu_isa_name);
  // forces the CPU kernels' instruction set ("auto": the best this CPU supports); an ISA this CPU or
  // build lacks raises. Set once (the executor's config, tests), never read from the environment.
  m.def("set_cpu_isa(str isa) -> ()", &set_cpu_isa);
}

}  // namespace openlora
