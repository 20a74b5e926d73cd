// CPU fused step (OpenMP + auto-vectorised inner loop). Torch-free: plain pointers and
// the FusedStepParams struct of fused_step_common.h. The caller guarantees that every
// non-null pointer addresses the sizes documented there and that num_alphas >= 1.
#pragma once

#include "fused_step_common.h"

namespace stepdrop {

// x_next (and x0_out) for float32 data: coefficients in float64, update in float32.
void fused_step_cpu_f32(const FusedStepParams& p);
// x_next (and x0_out) for float64 data: everything in float64.
void fused_step_cpu_f64(const FusedStepParams& p);

}  // namespace stepdrop
