// The served CPU ops' hot loops (cpu_kernels.h) for the avx2 instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["avx2"]); cpu_isa.cpp calls them only on a CPU that has it.
#if !(defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
#error "cpu_kernels_avx2.cpp must be compiled with ISA_FLAGS[\"avx2\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA avx2
#include "cpu_kernels_table.h"
