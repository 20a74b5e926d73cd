// Shared by the CPU and CUDA fused step: the parameter struct and the per-sample /
// per-element mathematics. Torch-free and CUDA-runtime-free; the functions compile as
// __host__ __device__ under nvcc. The specification is stepdrop/ops/reference.py
// (DESIGN.md §4); the formulas below follow it operation by operation, so the float64
// coefficients agree with the reference's to float64 rounding (not bit for bit: the
// reference takes 1/√ᾱ_t with torch's rsqrt, this code with 1.0 / sqrt; the tests compare
// with a 1e-12 tolerance).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define STEPDROP_HD __host__ __device__ __forceinline__
#else
#define STEPDROP_HD inline
#endif

namespace stepdrop {

enum Solver : int { kDDIM = 0, kDDPM = 1 };

// One fused step for a batch of B samples of N elements each (x is [B, N] row-major).
// Element pointers have the dtype chosen by the entry point (float or double); the
// optional ones (noise, active, x0_out) may be null. Everything lives on one device.
struct FusedStepParams {
  const void* x = nullptr;               // [B, N] x_t
  const void* eps = nullptr;             // [B, N] ε prediction
  const void* noise = nullptr;           // [B, N] z, or null (σ·z term dropped)
  const double* alphas_cumprod = nullptr;  // [num_alphas] ᾱ table
  const int64_t* t = nullptr;            // [B] current timestep (clamped into the table)
  const int64_t* s = nullptr;            // [B] next timestep; s < 0 means clean data (ᾱ_s = 1)
  const bool* active = nullptr;          // [B] or null (all active); inactive: copied through
  void* x_next = nullptr;                // [B, N] output x_s
  void* x0_out = nullptr;                // [B, N] output x̂0 (after clipping), or null
  int64_t batch = 0;                     // B
  int64_t numel_per_sample = 0;          // N
  int64_t num_alphas = 0;                // table length, must be >= 1
  int solver = kDDIM;                    // Solver
  double eta = 0.0;                      // DDIM η ∈ [0, 1] (ignored by DDPM)
  double clip = 0.0;                     // clip x̂0 to [−clip, clip]; 0 means no clipping
  int num_threads = 0;                   // CPU only: OpenMP threads, 0 = OpenMP default
};

// Per-sample coefficients of x_s = c_x0·x̂0 + c_x·x_t + c_eps·ε + σ·z, with
// x̂0 = x0_from_x·x_t + x0_from_eps·ε (reference.StepCoefficients, same order).
template <typename T>
struct StepCoef {
  T x0_from_x, x0_from_eps, c_x0, c_x, c_eps, sigma;
};

STEPDROP_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// reference.step_coefficients for one sample, in float64. Indices are clamped into the
// table, so bad or masked (t = -1) entries never read out of bounds.
STEPDROP_HD StepCoef<double> step_coefficients(const double* table, int64_t n, int64_t t, int64_t s, int solver,
                                               double eta) {
  const double a_t = table[clamp_index(t, n)];
  const double a_s = s >= 0 ? table[clamp_index(s, n)] : 1.0;
  StepCoef<double> c;
  c.x0_from_x = 1.0 / sqrt(a_t);
  c.x0_from_eps = -sqrt(1.0 - a_t) * c.x0_from_x;
  if (solver == kDDPM) {
    const double alpha_ts = a_t / a_s;
    const double beta_ts = 1.0 - alpha_ts;
    c.c_x0 = sqrt(a_s) * beta_ts / (1.0 - a_t);
    c.c_x = sqrt(alpha_ts) * (1.0 - a_s) / (1.0 - a_t);
    c.c_eps = 0.0;
    c.sigma = sqrt((1.0 - a_s) / (1.0 - a_t) * beta_ts);
  } else {  // DDIM
    const double var = eta * eta * (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s);
    const double rest = 1.0 - a_s - var;
    c.c_x0 = sqrt(a_s);
    c.c_x = 0.0;
    c.c_eps = sqrt(rest > 0.0 ? rest : 0.0);
    c.sigma = sqrt(var);
  }
  return c;
}

// The coefficients in the element-wise compute type (float for float32 input).
template <typename T>
STEPDROP_HD StepCoef<T> cast_coef(const StepCoef<double>& c) {
  return {T(c.x0_from_x), T(c.x0_from_eps), T(c.c_x0), T(c.c_x), T(c.c_eps), T(c.sigma)};
}

// x̂0 clipped to [lo, hi] (±inf when not clipping); NaN propagates like torch.clamp.
template <typename T>
STEPDROP_HD T predict_x0(const StepCoef<T>& c, T x, T e, T lo, T hi) {
  T x0 = c.x0_from_x * x + c.x0_from_eps * e;
  x0 = x0 < lo ? lo : x0;
  return x0 > hi ? hi : x0;
}

// x_s without the noise term (the caller adds σ·z when noise is given).
template <typename T>
STEPDROP_HD T transition(const StepCoef<T>& c, T x0, T x, T e) {
  return c.c_x0 * x0 + c.c_x * x + c.c_eps * e;
}

}  // namespace stepdrop
