// The served CPU ops' hot loops (cpu_kernels.h) for the avx512 instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["avx512"]); cpu_isa.cpp calls them only on a CPU that has it.
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && !defined(__AVX512BF16__))
#error "cpu_kernels_avx512.cpp must be compiled with ISA_FLAGS[\"avx512\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA avx512
#include "cpu_kernels_table.h"
