// The CPU kernels' instruction set, chosen at run time: one binary carries the served ops' hot loops
// (cpu_kernels.h: lora_paged_add_, paged attention, the layer ops) for AVX-512 (with and without
// AVX512_BF16), AVX2 + FMA and generic x86-64 (cpu_kernels_<isa>.cpp, each built with its own flags),
// and the best this CPU supports is used unless set_cpu_isa forces another.
#include "cpu_isa.h"

#include "cpu_kernels.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace openlora {
namespace {

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool always() { return true; }

struct Isa {
  const char* name;
  const CpuKernels* ops;
  bool (*supported)();
};

// Best first.
const Isa kIsas[] = {
    {"avx512_bf16", &avx512_bf16::kCpuKernels, has_avx512_bf16},
    {"avx512", &avx512::kCpuKernels, has_avx512},
    {"avx2", &avx2::kCpuKernels, has_avx2},
    {"generic", &generic::kCpuKernels, always},
};

const Isa* best() {
  __builtin_cpu_init();
  for (const Isa& isa : kIsas)
    if (isa.supported()) return &isa;
  return &kIsas[3];
}

std::atomic<const Isa*> g_isa{nullptr};

const Isa& current() {
  const Isa* isa = g_isa.load(std::memory_order_acquire);
  if (isa == nullptr) {
    isa = best();
    g_isa.store(isa, std::memory_order_release);
  }
  return *isa;
}

}  // namespace

const CpuKernels& cpu_ops() { return *current().ops; }
std::string cpu_isa_name() { return current().name; }

void set_cpu_isa(std::string name) {
  if (name == "auto") {
    g_isa.store(best(), std::memory_order_release);
    return;
  }
  __builtin_cpu_init();
  for (const Isa& isa : kIsas) {
    if (name != isa.name) continue;
    TORCH_CHECK(isa.supported(), "set_cpu_isa: this CPU lacks the ", name,
                " instructions; pick one it supports (avx512_bf16, avx512, avx2, generic, or auto)");
    g_isa.store(&isa, std::memory_order_release);
    return;
  }
  TORCH_CHECK(false, "set_cpu_isa: unknown instruction set '", name,
              "'; use avx512_bf16, avx512, avx2, generic or auto");
}

}  // namespace openlora
