// Torch-free smoke test of the CPU fused step (built and run by CMake/ctest): DDIM, DDPM,
// the clean end s = -1, clipping, masking and index clamping against the formulas of
// DESIGN.md §4 written out independently in float64. Exit status 0 on success.
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
  std::printf(failures ? "fused_step_cpu_selftest: %d failures\n" : "fused_step_cpu_selftest: ok\n", failures);
  return failures ? 1 : 0;
}
