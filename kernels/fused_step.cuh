// C-style launch API of the CUDA fused step and gradient-norm probe. No torch headers: the
// binding (csrc/bindings.cpp) fills the parameter structs with device pointers and passes
// torch's current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "fused_step_common.h"

// Launch one fused step on `stream` (asynchronous). All pointers in `p` must be device
// pointers on the current device. Returns the launch status (cudaSuccess for an empty batch).
cudaError_t stepdrop_fused_step_f32(const stepdrop::FusedStepParams& p, cudaStream_t stream);
cudaError_t stepdrop_fused_step_f64(const stepdrop::FusedStepParams& p, cudaStream_t stream);

// Bytes of zero-filled device workspace that stepdrop_grad_probe needs for `p` (its batch,
// numel_per_sample and dtype): 0 when each sample is reduced by one block.
size_t stepdrop_grad_probe_workspace_bytes(const stepdrop::GradProbeParams& p);
// Launch the probe on `stream` (asynchronous, one kernel): out[b] = ‖ε_probe − ε‖/(h‖v‖).
// p.workspace must point to the zero-filled bytes asked for above (null when 0). Returns the
// launch status (cudaSuccess for an empty batch).
cudaError_t stepdrop_grad_probe(const stepdrop::GradProbeParams& p, cudaStream_t stream);
