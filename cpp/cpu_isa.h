// Which instruction set the CPU kernels run (cpu_isa.cpp): chosen once, at the first call, as the
// best this CPU supports (__builtin_cpu_supports), or forced with set_cpu_isa (tests, the executor's
// config). Nothing here reads the environment.
#pragma once

#include <cstdint>
#include <string>

#include "lora_linear_cpu.h"

namespace openlora {

const IsaKernels& cpu_kernels();  // lora_linear's LoRA phases for the ISA in use
bool cpu_isa_is_avx512();         // whether that ISA is an AVX-512 one
std::string cpu_isa_name();       // "avx512_bf16", "avx512", "avx2" or "generic"
void set_cpu_isa(std::string isa);  // one of those or "auto"; one this CPU lacks raises
// Whether few-token fp32 lora_linear calls interleave the base matmul with the LoRA phases:
// -1 = where it measured faster (not with AVX-512), 0 = never, 1 = always.
void set_interleave(int64_t mode);
bool interleave_enabled();

}  // namespace openlora
