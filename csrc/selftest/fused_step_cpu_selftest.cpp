// Torch-free smoke test of the CPU fused step (built and run by CMake/ctest): DDIM, DDPM,
// the clean end s = -1, clipping, masking and index clamping against the formulas of
// docs/DESIGN.md §4 written out independently in float64; plan mode against the t/s/active
// mode; the gradient-norm probe on float16 data. Exit status 0 on success.
#include <cmath>
#include <cstdio>
#include <vector>

#include "fused_step_cpu.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int i) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s[%d]: got %.17g, want %.17g\n", what, i, got, want);
    ++failures;
  }
}

}  // namespace

int main() {
  const int T = 1000, B = 4, N = 7;
  std::vector<double> table(T);
  double prod = 1.0;
  for (int i = 0; i < T; ++i) table[i] = prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / (T - 1));
  std::vector<double> x(B * N), e(B * N), z(B * N), out(B * N), x0(B * N);
  for (int i = 0; i < B * N; ++i) {
    x[i] = std::sin(1.0 + i) * 2.0;
    e[i] = std::cos(3.0 * i);
    z[i] = std::sin(0.5 * i * i);
  }
  // sample 0: t=900 -> 700; 1: t=10 -> clean; 2: masked; 3: t beyond the table -> 500.
  const int64_t t[B] = {900, 10, -1, 5000};
  const int64_t s[B] = {700, -1, 123456, 500};
  const bool active[B] = {true, true, false, true};
  const double clip = 1.5;

  for (int solver : {stepdrop::kDDIM, stepdrop::kDDPM}) {
    const double eta = solver == stepdrop::kDDIM ? 0.4 : 0.0;
    stepdrop::FusedStepParams p;
    p.x = x.data(), p.eps = e.data(), p.noise = z.data(), p.alphas_cumprod = table.data();
    p.t = t, p.s = s, p.active = active, p.x_next = out.data(), p.x0_out = x0.data();
    p.batch = B, p.numel_per_sample = N, p.num_alphas = T, p.solver = solver, p.eta = eta, p.clip = clip;
    stepdrop::fused_step_cpu_f64(p);
    for (int b = 0; b < B; ++b) {
      const double at = table[t[b] < 0 ? 0 : (t[b] >= T ? T - 1 : t[b])];
      const double as = s[b] < 0 ? 1.0 : table[s[b] >= T ? T - 1 : s[b]];
      for (int j = 0; j < N; ++j) {
        const int i = b * N + j;
        double want_x0 = x[i], want = x[i];
        if (active[b]) {
          want_x0 = std::fmax(-clip, std::fmin(clip, (x[i] - std::sqrt(1 - at) * e[i]) / std::sqrt(at)));
          if (solver == stepdrop::kDDIM) {
            const double sig2 = eta * eta * (1 - as) / (1 - at) * (1 - at / as);
            want = std::sqrt(as) * want_x0 + std::sqrt(std::fmax(1 - as - sig2, 0.0)) * e[i] + std::sqrt(sig2) * z[i];
          } else {
            const double a = at / as;
            want = (std::sqrt(as) * (1 - a) * want_x0 + std::sqrt(a) * (1 - as) * x[i]) / (1 - at) +
                   std::sqrt((1 - as) / (1 - at) * (1 - a)) * z[i];
          }
        }
        expect_near(out[i], want, 1e-12, solver == stepdrop::kDDIM ? "ddim x_next" : "ddpm x_next", i);
        expect_near(x0[i], want_x0, 1e-12, "x0", i);
      }
    }
  }
  // Plan mode: the same samples as rows of a plan at step k = 1 (sample 2 finished); its
  // x_next equals the t/s/active run's bit for bit, and the bookkeeping is written.
  {
    const int L = 3;
    const int64_t plan[B * L] = {950, 900, 700, 20, 10, -1, 30, -1, -1, 6000, 5000, 500};
    int64_t nfe[B] = {3, 3, 3, 3}, t_next[B] = {9, 9, 9, 9};
    bool active_next[B] = {false, false, true, false};
    std::vector<double> ref(B * N);
    stepdrop::FusedStepParams p;
    p.x = x.data(), p.eps = e.data(), p.noise = z.data(), p.alphas_cumprod = table.data();
    p.t = t, p.s = s, p.active = active, p.x_next = ref.data();
    p.batch = B, p.numel_per_sample = N, p.num_alphas = T, p.solver = stepdrop::kDDIM, p.eta = 0.4, p.clip = clip;
    stepdrop::fused_step_cpu_f64(p);
    p.t = p.s = nullptr, p.active = nullptr, p.x_next = out.data();
    p.plan = plan, p.plan_stride_b = L, p.plan_stride_k = 1, p.plan_k = 1;
    p.nfe = nfe, p.t_next = t_next, p.active_next = active_next;
    stepdrop::fused_step_cpu_f64(p);
    for (int i = 0; i < B * N; ++i) expect_near(out[i], ref[i], 0.0, "plan x_next", i);
    const int64_t want_nfe[B] = {4, 4, 3, 4}, want_t_next[B] = {700, 0, 0, 500};
    const bool want_active_next[B] = {true, false, false, true};
    for (int b = 0; b < B; ++b) {
      expect_near(double(nfe[b]), double(want_nfe[b]), 0.0, "nfe", b);
      expect_near(double(t_next[b]), double(want_t_next[b]), 0.0, "t_next", b);
      expect_near(double(active_next[b]), double(want_active_next[b]), 0.0, "active_next", b);
    }
  }
  // Gradient-norm probe on float16 data: ‖ε_probe − ε‖/(h‖v‖) per sample.
  {
    // 1.5, -2, 0.25, 3 (probe); 0.5, 0, 0, -1 (eps); 1, 2, 2, 4 (v) as binary16 bits
    const stepdrop::Half q[4] = {{0x3e00}, {0xc000}, {0x3400}, {0x4200}};
    const stepdrop::Half ep[4] = {{0x3800}, {0x0000}, {0x0000}, {0xbc00}};
    const stepdrop::Half v[4] = {{0x3c00}, {0x4000}, {0x4000}, {0x4400}};
    float got[2];
    stepdrop::GradProbeParams p;
    p.eps_probe = q, p.eps = ep, p.v = v, p.out = got, p.batch = 2, p.numel_per_sample = 2, p.step = 0.5;
    p.dtype = stepdrop::kFloat16;
    stepdrop::grad_probe_cpu(p);
    expect_near(got[0], std::sqrt(1.0 + 4.0) / (0.5 * std::sqrt(1.0 + 4.0)), 1e-7, "probe", 0);
    expect_near(got[1], std::sqrt(0.0625 + 16.0) / (0.5 * std::sqrt(4.0 + 16.0)), 1e-7, "probe", 1);
  }
  std::printf(failures ? "fused_step_cpu_selftest: %d failures\n" : "fused_step_cpu_selftest: ok\n", failures);
  return failures ? 1 : 0;
}
