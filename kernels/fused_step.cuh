// C-style launch API of the CUDA fused step. No torch headers: the binding (csrc/bindings.cpp)
// fills FusedStepParams with device pointers and passes torch's current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "fused_step_common.h"

// Launch one fused step on `stream` (asynchronous). All pointers in `p` must be device
// pointers on the current device. Returns the launch status (cudaSuccess for an empty batch).
cudaError_t stepdrop_fused_step_f32(const stepdrop::FusedStepParams& p, cudaStream_t stream);
cudaError_t stepdrop_fused_step_f64(const stepdrop::FusedStepParams& p, cudaStream_t stream);
