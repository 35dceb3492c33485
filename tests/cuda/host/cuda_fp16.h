// Stands in for the CUDA toolkit's cuda_fp16.h on the host: see cuda_emulation.h.
#pragma once
#include "cuda_emulation.h"
