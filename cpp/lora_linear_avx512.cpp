// lora_linear's LoRA phases (lora_tiles.h) for the avx512 instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["avx512"]); the driver calls them only on a CPU that has it.
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && !defined(__AVX512BF16__))
#error "lora_linear_avx512.cpp must be compiled with ISA_FLAGS[\"avx512\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA avx512
#define OPENLORA_ISA_TABLE kKernels
#include "lora_tiles.h"
