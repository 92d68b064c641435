// lora_linear's LoRA phases (lora_tiles.h) for the avx2 instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["avx2"]); the driver calls them only on a CPU that has it.
#if !(defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
#error "lora_linear_avx2.cpp must be compiled with ISA_FLAGS[\"avx2\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA avx2
#define OPENLORA_ISA_TABLE kKernels
#include "lora_tiles.h"
