// Stands in for the CUDA toolkit's cuda_runtime_api.h on the host: see cuda_emulation.h.
#pragma once
#include "cuda_emulation.h"
