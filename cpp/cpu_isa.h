// Which instruction set the CPU kernels run (cpu_isa.cpp; the kernels' tables: cpu_kernels.h): chosen
// once, at the first call, as the best this CPU supports (__builtin_cpu_supports), or forced with
// set_cpu_isa (tests, the executor's --cpu-isa). Nothing here reads the environment.
#pragma once

#include <string>

namespace openlora {

std::string cpu_isa_name();         // "avx512_bf16", "avx512", "avx2" or "generic"
void set_cpu_isa(std::string isa);  // one of those or "auto"; one this CPU lacks raises

}  // namespace openlora
