// The served CPU ops' hot loops (cpu_kernels.h) for the generic instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["generic"]); cpu_isa.cpp calls them only on a CPU that has it.
#if !(!defined(__AVX2__) && !defined(__AVX512F__))
#error "cpu_kernels_generic.cpp must be compiled with ISA_FLAGS[\"generic\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA generic
#include "cpu_kernels_table.h"
