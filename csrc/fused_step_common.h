// Shared by the CPU and CUDA fused step: the parameter struct and the per-sample /
// per-element mathematics. Torch-free and CUDA-runtime-free; the functions compile as
// __host__ __device__ under nvcc. The specification is stepdrop/ops/reference.py
// (docs/DESIGN.md §4); the formulas below follow it operation by operation, so the float64
// coefficients agree with the reference's to float64 rounding (not bit for bit: the
// reference takes 1/√ᾱ_t with torch's rsqrt, this code with 1.0 / sqrt; the tests compare
// with a 1e-12 tolerance).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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
//
// The per-sample indices come either from t, s and active, or — when `plan` is set — from
// columns k and k+1 of a per-sample plan (t = plan[b, k], s = plan[b, k+1], active = t >= 0;
// t, s and active are then unused). In plan mode the step also does the loop's bookkeeping
// for each sample, once (the work item or block of the sample's first chunk): nfe[b] += active,
// t_next[b] = max(s, 0), active_next[b] = s >= 0, each only where its pointer is set.
struct FusedStepParams {
  const void* x = nullptr;               // [B, N] x_t
  const void* eps = nullptr;             // [B, N] ε prediction
  const void* noise = nullptr;           // [B, N] z, or null (σ·z term dropped)
  const double* alphas_cumprod = nullptr;  // [num_alphas] ᾱ table
  const int64_t* t = nullptr;            // [B] current timestep (clamped into the table)
  const int64_t* s = nullptr;            // [B] next timestep; s < 0 means clean data (ᾱ_s = 1)
  const bool* active = nullptr;          // [B] or null (all active); inactive: copied through
  const int64_t* plan = nullptr;         // [B, L] plan with strides (plan_stride_b, plan_stride_k), or null
  int64_t plan_stride_b = 0;             // elements between plan rows (0 for one plan shared by all)
  int64_t plan_stride_k = 1;             // elements between plan columns
  int64_t plan_k = 0;                    // the loop step k, in [0, L-2]: a kernel argument, so a
                                         // captured CUDA graph replays every step with its own k
  int64_t* nfe = nullptr;                // [B] in/out model-call counter, or null
  int64_t* t_next = nullptr;             // [B] out: timestep of the next model call, or null
  bool* active_next = nullptr;           // [B] out: whether the sample is still active next step, or null
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

// The transition of one sample: its indices t → s and whether it is active.
struct SampleStep {
  int64_t t, s;
  bool live;
};

// Sample b's step, from plan columns k, k+1 in plan mode, else from t, s and active.
STEPDROP_HD SampleStep sample_step(const FusedStepParams& p, int64_t b) {
  if (p.plan != nullptr) {
    const int64_t* row = p.plan + b * p.plan_stride_b;
    const int64_t t = row[p.plan_k * p.plan_stride_k];
    return {t, row[(p.plan_k + 1) * p.plan_stride_k], t >= 0};
  }
  return {p.t[b], p.s[b], p.active == nullptr || p.active[b]};
}

// Plan mode's bookkeeping for sample b; the caller runs it exactly once per sample, so the
// read-modify-write of nfe has no race. t_next is clamped to 0 so that a finished sample's
// next model call indexes a valid embedding.
STEPDROP_HD void plan_bookkeeping(const FusedStepParams& p, int64_t b, const SampleStep& st) {
  if (p.plan == nullptr) return;
  if (p.nfe != nullptr) p.nfe[b] += st.live ? 1 : 0;
  if (p.t_next != nullptr) p.t_next[b] = st.s > 0 ? st.s : 0;
  if (p.active_next != nullptr) p.active_next[b] = st.s >= 0;
}

// Whether a launch has anything to do: elements to update, or plan bookkeeping to write.
STEPDROP_HD bool has_work(const FusedStepParams& p) {
  const bool bookkeeping = p.plan != nullptr && (p.nfe != nullptr || p.t_next != nullptr || p.active_next != nullptr);
  return p.batch > 0 && (p.numel_per_sample > 0 || bookkeeping);
}

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

// ------------------------------------------------------------------ gradient-norm probe
// Per-sample ‖J v‖/‖v‖ with J v ≈ (ε(x + h·v) − ε(x))/h (reference.grad_norm_probe):
// out[b] = √(Σ_i (ε_probe − ε)_i²) / (h·√(Σ_i v_i²)), the two sums accumulated in float32
// (float64 for float64 input).

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Storage types of the half-precision inputs: raw IEEE-754 binary16 / bfloat16 bits, so this
// header needs neither torch nor cuda_fp16.h. Loaded through to_accum() below.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

STEPDROP_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// binary16 → float32, exact for every value (subnormals, ±inf and NaN included).
STEPDROP_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = h & 0x7c00u;
  if (exponent == 0x7c00u) return float_from_bits(sign | 0x7f800000u | (uint32_t(h & 0x3ffu) << 13));  // inf, NaN
  if (exponent != 0) return float_from_bits(sign | ((uint32_t(h & 0x7fffu) << 13) + 0x38000000u));  // rebias 15 → 127
  const float sub = float(h & 0x3ffu) * 5.9604644775390625e-08f;  // subnormal: mantissa · 2^-24
  return sign ? -sub : sub;
}

// The accumulation type of each storage type, and the load into it.
template <typename T>
struct Accum {
  using type = float;
};
template <>
struct Accum<double> {
  using type = double;
};

STEPDROP_HD float to_accum(float v) { return v; }
STEPDROP_HD double to_accum(double v) { return v; }
STEPDROP_HD float to_accum(Half v) { return half_to_float(v.bits); }
STEPDROP_HD float to_accum(BFloat16 v) { return float_from_bits(uint32_t(v.bits) << 16); }

// Inputs of the probe for B samples of N elements each, all [B, N] row-major in one dtype.
struct GradProbeParams {
  const void* eps_probe = nullptr;  // [B, N] ε(x + h·v)
  const void* eps = nullptr;        // [B, N] ε(x)
  const void* v = nullptr;          // [B, N] probe direction
  void* out = nullptr;              // [B] result: float, or double for float64 input
  int64_t batch = 0;                // B
  int64_t numel_per_sample = 0;     // N
  double step = 1.0;                // h > 0
  int dtype = kFloat32;             // DType of the three inputs
  int num_threads = 0;              // CPU only: OpenMP threads, 0 = OpenMP default
  void* workspace = nullptr;        // CUDA only: zero-filled scratch of the size the launcher asks for
};

// One element's contributions (Σ(ε_probe − ε)², Σv²) to the two sums.
template <typename A, typename T>
STEPDROP_HD void probe_accumulate(A& diff2, A& v2, T probe, T e, T v) {
  const A d = to_accum(probe) - to_accum(e);
  const A w = to_accum(v);
  diff2 += d * d;
  v2 += w * w;
}

// The probe from the two sums: √diff2 / (h·√v2), finished in float64 (the same correctly
// rounded operations on the host and the device), then cast to the accumulation type.
template <typename A>
STEPDROP_HD A probe_finish(A diff2, A v2, double step) {
  return A(sqrt(double(diff2)) / (step * sqrt(double(v2))));
}

}  // namespace stepdrop
