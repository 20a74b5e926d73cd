// stepdrop._C: the torch binding of the fused step. It checks its inputs (cheaply: dtype,
// device, shape, contiguity — never tensor values), fills FusedStepParams and dispatches
// to the CPU kernel or, when built with -DSTEPDROP_WITH_CUDA, the CUDA kernel on torch's
// current stream. No mathematics here: see fused_step_common.h.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>
#include <string>

#include "fused_step_cpu.h"

#ifdef STEPDROP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fused_step.cuh"
#endif

namespace {

constexpr const char* kFn = "stepdrop._C.fused_step: ";

void check_dense(const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.device() == x.device(), kFn, name, " must be on ", x.device(), " like x, got ", v.device());
  TORCH_CHECK(v.is_contiguous(), kFn, name, " must be contiguous");
}

// eps, noise and x0_out: same dtype, shape and device as x, contiguous.
void check_like_x(const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), kFn, name, " must have the dtype of x (", x.scalar_type(),
              "), got ", v.scalar_type());
  TORCH_CHECK(v.sizes() == x.sizes(), kFn, name, " must have the shape of x ", x.sizes(), ", got ", v.sizes());
  check_dense(name, v, x);
}

// t, s and active: one entry per sample.
void check_per_sample(const char* name, const at::Tensor& v, at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(v.scalar_type() == dtype, kFn, name, " must be ", dtype, ", got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), kFn, name, " must have shape [", x.size(0), "], got ",
              v.sizes());
  check_dense(name, v, x);
}

at::Tensor fused_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                      const at::Tensor& t, const at::Tensor& s, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& active, int64_t solver, double eta, double clip,
                      const std::optional<at::Tensor>& x0_out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kFn,
              "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, kFn, "x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(x.is_contiguous(), kFn, "x must be contiguous");
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), kFn, "x must be on a CPU or CUDA device, got ", x.device());
  check_like_x("eps", eps, x);
  TORCH_CHECK(alphas_cumprod.scalar_type() == at::kDouble, kFn, "alphas_cumprod must be float64, got ",
              alphas_cumprod.scalar_type());
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.numel() >= 1, kFn,
              "alphas_cumprod must be a non-empty 1-D table, got shape ", alphas_cumprod.sizes());
  check_dense("alphas_cumprod", alphas_cumprod, x);
  check_per_sample("t", t, at::kLong, x);
  check_per_sample("s", s, at::kLong, x);
  if (noise) check_like_x("noise", *noise, x);
  if (active) check_per_sample("active", *active, at::kBool, x);
  TORCH_CHECK(solver == stepdrop::kDDIM || solver == stepdrop::kDDPM, kFn, "solver must be 0 (ddim) or 1 (ddpm), got ",
              solver);
  TORCH_CHECK(eta >= 0.0 && eta <= 1.0, kFn, "eta must be in [0, 1], got ", eta);
  TORCH_CHECK(clip >= 0.0, kFn, "clip must be >= 0 (0 = no clipping), got ", clip);
  if (x0_out) {
    check_like_x("x0_out", *x0_out, x);
    at::assert_no_internal_overlap(*x0_out);
    for (const at::Tensor* in : {&x, &eps}) at::assert_no_overlap(*x0_out, *in);
    if (noise) at::assert_no_overlap(*x0_out, *noise);
  }

  at::Tensor x_next = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0);
  stepdrop::FusedStepParams p;
  p.x = x.data_ptr();
  p.eps = eps.data_ptr();
  p.noise = noise ? noise->data_ptr() : nullptr;
  p.alphas_cumprod = alphas_cumprod.data_ptr<double>();
  p.t = t.data_ptr<int64_t>();
  p.s = s.data_ptr<int64_t>();
  p.active = active ? active->data_ptr<bool>() : nullptr;
  p.x_next = x_next.data_ptr();
  p.x0_out = x0_out ? x0_out->data_ptr() : nullptr;
  p.batch = batch;
  p.numel_per_sample = batch > 0 ? x.numel() / batch : 0;
  p.num_alphas = alphas_cumprod.numel();
  p.solver = static_cast<int>(solver);
  p.eta = eta;
  p.clip = clip;
  p.num_threads = at::get_num_threads();
  const bool f64 = x.scalar_type() == at::kDouble;

  if (x.is_cuda()) {
#ifdef STEPDROP_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const cudaError_t err = f64 ? stepdrop_fused_step_f64(p, stream) : stepdrop_fused_step_f32(p, stream);
    TORCH_CHECK(err == cudaSuccess, kFn, "CUDA launch failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, kFn, "x is on ", x.device(), " but stepdrop._C was built without CUDA kernels");
#endif
  } else {
    // The kernels touch no Python objects: let other Python threads run meanwhile.
    pybind11::gil_scoped_release no_gil;
    f64 ? stepdrop::fused_step_cpu_f64(p) : stepdrop::fused_step_cpu_f32(p);
  }
  return x_next;
}

bool has_cuda() {
#ifdef STEPDROP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stepdrop native kernels: the fused sampling step (CPU; CUDA when built with it)";
  m.def("fused_step", &fused_step, pybind11::arg("x"), pybind11::arg("eps"), pybind11::arg("alphas_cumprod"),
        pybind11::arg("t"), pybind11::arg("s"), pybind11::arg("noise"), pybind11::arg("active"),
        pybind11::arg("solver"), pybind11::arg("eta"), pybind11::arg("clip"), pybind11::arg("x0_out"),
        "One transition t -> s per sample (stepdrop.ops.reference.fused_step_reference); returns x_next and, "
        "when x0_out is given, writes the clipped x0 prediction into it. Inputs must be contiguous; s < 0 is "
        "the clean end (alpha_bar = 1); inactive samples are copied through.");
  m.def("has_cuda", &has_cuda, "True iff this build contains the CUDA kernels");
}
