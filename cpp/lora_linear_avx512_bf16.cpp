// lora_linear's LoRA phases (lora_tiles.h) for the avx512_bf16 instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["avx512_bf16"]); the driver calls them only on a CPU that has it.
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__))
#error "lora_linear_avx512_bf16.cpp must be compiled with ISA_FLAGS[\"avx512_bf16\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA avx512_bf16
#define OPENLORA_ISA_TABLE kKernels
#include "lora_tiles.h"
