// CPU fused step and gradient-norm probe (OpenMP + auto-vectorised inner loops). Torch-free:
// plain pointers and the FusedStepParams / GradProbeParams structs of fused_step_common.h.
// The caller guarantees that every non-null pointer addresses the sizes documented there
// and that num_alphas >= 1.
#pragma once

#include "fused_step_common.h"

namespace stepdrop {

// x_next (and x0_out) for float32 data: coefficients in float64, update in float32.
void fused_step_cpu_f32(const FusedStepParams& p);
// x_next (and x0_out) for float64 data: everything in float64.
void fused_step_cpu_f64(const FusedStepParams& p);
// out[b] = ‖ε_probe − ε‖/(h‖v‖) per sample, for inputs of dtype p.dtype (float32 sums for
// float32/float16/bfloat16 input, float64 for float64); deterministic for any thread count.
void grad_probe_cpu(const GradProbeParams& p);

}  // namespace stepdrop
