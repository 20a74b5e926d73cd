// stepdrop._C: the torch binding of the fused step, the fused plan step and the gradient-norm
// probe. Each entry point checks its inputs (cheaply: dtype, device, shape, contiguity —
// never tensor values), fills a parameter struct and dispatches to the CPU kernel or, when
// built with -DSTEPDROP_WITH_CUDA, the CUDA kernel on torch's current stream. No mathematics
// here: see fused_step_common.h.
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

constexpr const char* kFn = "stepdrop._C: ";

// On the device of `x` (the first data argument: x, or eps for the probe) and contiguous.
void check_dense(const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.device() == x.device(), kFn, name, " must be on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.is_contiguous(), kFn, name, " must be contiguous");
}

// eps, noise and x0_out (like x), eps_probe and v (like eps): same dtype, shape and device
// as the tensor `ref` names, contiguous.
void check_like(const char* name, const at::Tensor& v, const char* ref, const at::Tensor& x) {
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), kFn, name, " must have the dtype of ", ref, " (", x.scalar_type(),
              "), got ", v.scalar_type());
  TORCH_CHECK(v.sizes() == x.sizes(), kFn, name, " must have the shape of ", ref, " ", x.sizes(), ", got ", v.sizes());
  check_dense(name, v, x);
}

void check_like_x(const char* name, const at::Tensor& v, const at::Tensor& x) { check_like(name, v, "x", x); }

// t, s and active: one entry per sample.
void check_per_sample(const char* name, const at::Tensor& v, at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(v.scalar_type() == dtype, kFn, name, " must be ", dtype, ", got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), kFn, name, " must have shape [", x.size(0), "], got ",
              v.sizes());
  check_dense(name, v, x);
}

// The checks and fields shared by fused_step and fused_plan_step: x, ε, z, the table, the
// solver and its scalars. The per-sample indices and outputs are the caller's.
stepdrop::FusedStepParams update_params(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                                        const std::optional<at::Tensor>& noise, int64_t solver, double eta,
                                        double clip) {
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
  if (noise) check_like_x("noise", *noise, x);
  TORCH_CHECK(solver == stepdrop::kDDIM || solver == stepdrop::kDDPM, kFn, "solver must be 0 (ddim) or 1 (ddpm), got ",
              solver);
  TORCH_CHECK(eta >= 0.0 && eta <= 1.0, kFn, "eta must be in [0, 1], got ", eta);
  TORCH_CHECK(clip >= 0.0, kFn, "clip must be >= 0 (0 = no clipping), got ", clip);

  stepdrop::FusedStepParams p;
  p.x = x.data_ptr();
  p.eps = eps.data_ptr();
  p.noise = noise ? noise->data_ptr() : nullptr;
  p.alphas_cumprod = alphas_cumprod.data_ptr<double>();
  p.batch = x.size(0);
  p.numel_per_sample = p.batch > 0 ? x.numel() / p.batch : 0;
  p.num_alphas = alphas_cumprod.numel();
  p.solver = static_cast<int>(solver);
  p.eta = eta;
  p.clip = clip;
  p.num_threads = at::get_num_threads();
  return p;
}

// Allocates x_next, completes `p` with it and runs the step on x's device.
at::Tensor run_step(stepdrop::FusedStepParams& p, const at::Tensor& x) {
  at::Tensor x_next = at::empty_like(x, at::MemoryFormat::Contiguous);
  p.x_next = x_next.data_ptr();
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

at::Tensor fused_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                      const at::Tensor& t, const at::Tensor& s, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& active, int64_t solver, double eta, double clip,
                      const std::optional<at::Tensor>& x0_out) {
  stepdrop::FusedStepParams p = update_params(x, eps, alphas_cumprod, noise, solver, eta, clip);
  check_per_sample("t", t, at::kLong, x);
  check_per_sample("s", s, at::kLong, x);
  if (active) check_per_sample("active", *active, at::kBool, x);
  if (x0_out) {
    check_like_x("x0_out", *x0_out, x);
    at::assert_no_internal_overlap(*x0_out);
    for (const at::Tensor* in : {&x, &eps}) at::assert_no_overlap(*x0_out, *in);
    if (noise) at::assert_no_overlap(*x0_out, *noise);
  }
  p.t = t.data_ptr<int64_t>();
  p.s = s.data_ptr<int64_t>();
  p.active = active ? active->data_ptr<bool>() : nullptr;
  p.x0_out = x0_out ? x0_out->data_ptr() : nullptr;
  return run_step(p, x);
}

at::Tensor fused_plan_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                           const at::Tensor& plan, int64_t k, const std::optional<at::Tensor>& noise, int64_t solver,
                           double eta, double clip, const std::optional<at::Tensor>& nfe,
                           const std::optional<at::Tensor>& t_next, const std::optional<at::Tensor>& active_next) {
  stepdrop::FusedStepParams p = update_params(x, eps, alphas_cumprod, noise, solver, eta, clip);
  // Any strides: the kernels read plan[b, k] and plan[b, k+1] through them (an expanded shared plan is not copied).
  TORCH_CHECK(plan.scalar_type() == at::kLong, kFn, "plan must be Long, got ", plan.scalar_type());
  TORCH_CHECK(plan.dim() == 2 && plan.size(0) == x.size(0) && plan.size(1) >= 2, kFn, "plan must have shape [",
              x.size(0), ", L] with L >= 2, got ", plan.sizes());
  TORCH_CHECK(plan.device() == x.device(), kFn, "plan must be on ", x.device(), " like x, got ", plan.device());
  TORCH_CHECK(k >= 0 && k <= plan.size(1) - 2, kFn, "k must be in [0, ", plan.size(1) - 2, "], got ", k);
  if (nfe) check_per_sample("nfe", *nfe, at::kLong, x);
  if (t_next) check_per_sample("t_next", *t_next, at::kLong, x);
  if (active_next) check_per_sample("active_next", *active_next, at::kBool, x);
  // The outputs are written while plan is read, and nfe is read and written: no two may share memory.
  const std::optional<at::Tensor>* outs[] = {&nfe, &t_next, &active_next};
  for (size_t i = 0; i < 3; ++i) {
    if (!*outs[i]) continue;
    at::assert_no_overlap(**outs[i], plan);
    for (size_t j = i + 1; j < 3; ++j)
      if (*outs[j]) at::assert_no_overlap(**outs[i], **outs[j]);
  }
  p.plan = plan.data_ptr<int64_t>();
  p.plan_stride_b = plan.stride(0);
  p.plan_stride_k = plan.stride(1);
  p.plan_k = k;
  p.nfe = nfe ? nfe->data_ptr<int64_t>() : nullptr;
  p.t_next = t_next ? t_next->data_ptr<int64_t>() : nullptr;
  p.active_next = active_next ? active_next->data_ptr<bool>() : nullptr;
  return run_step(p, x);
}

at::Tensor grad_probe(const at::Tensor& eps_probe, const at::Tensor& eps, const at::Tensor& v, double step) {
  const at::ScalarType dtype = eps.scalar_type();
  int code = stepdrop::kFloat32;
  switch (dtype) {
    case at::kFloat: code = stepdrop::kFloat32; break;
    case at::kDouble: code = stepdrop::kFloat64; break;
    case at::kHalf: code = stepdrop::kFloat16; break;
    case at::kBFloat16: code = stepdrop::kBFloat16; break;
    default: TORCH_CHECK(false, kFn, "eps must be float32, float64, float16 or bfloat16, got ", dtype);
  }
  TORCH_CHECK(eps.dim() >= 1, kFn, "eps must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(eps.is_cpu() || eps.is_cuda(), kFn, "eps must be on a CPU or CUDA device, got ", eps.device());
  check_dense("eps", eps, eps);
  check_like("eps_probe", eps_probe, "eps", eps);
  check_like("v", v, "eps", eps);
  TORCH_CHECK(std::isfinite(step) && step > 0.0, kFn, "step must be finite and > 0, got ", step);

  const int64_t batch = eps.size(0);
  at::Tensor out = at::empty({batch}, eps.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  stepdrop::GradProbeParams p;
  p.eps_probe = eps_probe.data_ptr();
  p.eps = eps.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.batch = batch;
  p.numel_per_sample = batch > 0 ? eps.numel() / batch : 0;
  p.step = step;
  p.dtype = code;
  p.num_threads = at::get_num_threads();
  if (eps.is_cuda()) {
#ifdef STEPDROP_WITH_CUDA
    const c10::cuda::CUDAGuard guard(eps.device());
    // Where a sample is split over several blocks, they meet in a workspace whose per-sample
    // arrival counters must start at zero (kernels/grad_probe.cu).
    const size_t bytes = stepdrop_grad_probe_workspace_bytes(p);
    at::Tensor workspace;
    if (bytes > 0) workspace = at::zeros({static_cast<int64_t>(bytes)}, eps.options().dtype(at::kByte));
    p.workspace = bytes > 0 ? workspace.data_ptr() : nullptr;
    const cudaError_t err = stepdrop_grad_probe(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kFn, "CUDA launch failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, kFn, "eps is on ", eps.device(), " but stepdrop._C was built without CUDA kernels");
#endif
  } else {
    pybind11::gil_scoped_release no_gil;
    stepdrop::grad_probe_cpu(p);
  }
  return out;
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
  m.doc() = "stepdrop native kernels: the fused sampling step and gradient-norm probe (CPU; CUDA when built with it)";
  m.def("fused_step", &fused_step, pybind11::arg("x"), pybind11::arg("eps"), pybind11::arg("alphas_cumprod"),
        pybind11::arg("t"), pybind11::arg("s"), pybind11::arg("noise"), pybind11::arg("active"),
        pybind11::arg("solver"), pybind11::arg("eta"), pybind11::arg("clip"), pybind11::arg("x0_out"),
        "One transition t -> s per sample (stepdrop.ops.reference.fused_step_reference); returns x_next and, "
        "when x0_out is given, writes the clipped x0 prediction into it. Inputs must be contiguous; s < 0 is "
        "the clean end (alpha_bar = 1); inactive samples are copied through.");
  m.def("fused_plan_step", &fused_plan_step, pybind11::arg("x"), pybind11::arg("eps"),
        pybind11::arg("alphas_cumprod"), pybind11::arg("plan"), pybind11::arg("k"), pybind11::arg("noise"),
        pybind11::arg("solver"), pybind11::arg("eta"), pybind11::arg("clip"), pybind11::arg("nfe"),
        pybind11::arg("t_next"), pybind11::arg("active_next"),
        "fused_step with t = plan[:, k], s = plan[:, k+1], active = t >= 0 "
        "(stepdrop.ops.reference.fused_plan_step_reference); in the same launch, where given: nfe += active "
        "(in place), t_next = max(plan[:, k+1], 0), active_next = plan[:, k+1] >= 0. plan may have any strides; "
        "the other tensors must be contiguous.");
  m.def("grad_probe", &grad_probe, pybind11::arg("eps_probe"), pybind11::arg("eps"), pybind11::arg("v"),
        pybind11::arg("step"),
        "Per-sample ||eps_probe - eps|| / (step * ||v||) (stepdrop.ops.reference.grad_norm_probe), summed in "
        "float32 (float64 for float64 input); returns a float32 (float64) [B] tensor. Inputs contiguous, one dtype.");
  m.def("has_cuda", &has_cuda, "True iff this build contains the CUDA kernels");
}
