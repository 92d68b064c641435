// lora_linear's LoRA phases (lora_tiles.h) for the generic instruction set, compiled with its own flags
// (services/executor/ops/build.py: ISA_FLAGS["generic"]); the driver calls them only on a CPU that has it.
#if !(!defined(__AVX2__) && !defined(__AVX512F__))
#error "lora_linear_generic.cpp must be compiled with ISA_FLAGS[\"generic\"] (services/executor/ops/build.py)"
#endif
#define OPENLORA_ISA generic
#define OPENLORA_ISA_TABLE kKernels
#include "lora_tiles.h"
