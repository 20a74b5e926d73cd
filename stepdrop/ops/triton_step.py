"""Triton backend of the fused ops (the "triton" backend of :mod:`stepdrop.ops`).

Fused step: one program per (sample, block of that sample's elements): it loads the sample's
t, s and active flag — or, for the plan step, t = plan[b, k], s = plan[b, k+1], active = t ≥ 0 —
gathers ᾱ_t, ᾱ_s from the float64 table (indices clamped, so masked or bad entries never read
out of bounds; s < 0 gives ᾱ_s = 1), computes the per-sample coefficients of
:func:`stepdrop.ops.reference.step_coefficients` in float64 (the formulas of
``csrc/fused_step_common.h``, operation by operation), then the element-wise update in the
input's dtype (float32, or float64 for float64 input). Program (b, 0) also writes the plan
step's bookkeeping for sample b. Same contracts as
:func:`stepdrop.ops.reference.fused_step_reference` and
:func:`~stepdrop.ops.reference.fused_plan_step_reference`.

Gradient probe: one program per sample sums (ε_probe − ε)² and v² over its elements, block by
block, in float32 (float64 for float64 input), and writes √Σ/(h·√Σ)
(:func:`stepdrop.ops.reference.grad_norm_probe`). Inputs reach every launcher validated
(:mod:`stepdrop.ops._inputs`).

Triton is imported lazily, on the first launch: without it this module still imports and
:func:`triton_available` says False. On CUDA tensors the kernel is compiled; on CPU tensors it
runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
which is slow and meant for tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct

import torch
from torch import Tensor

from stepdrop.ops.reference import SOLVERS
from stepdrop.ops.step_args import PlanOutputs, StepOptions

BLOCK_SIZE = 1024
"""Elements of one sample handled by one program of the step, or per iteration of the
probe (the tail block is masked)."""
MAX_GRID_Y = 65535
"""CUDA's limit on the second grid dimension; longer samples loop over their blocks."""

_STATE: dict = {}  # "importable" (cached find_spec); filled by _load(): "kernels" and "interpret", or "error"
triton = tl = None  # the modules, bound by _load(): importing triton is deferred to the first launch


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _fused_step_kernel(
    x_ptr, eps_ptr, noise_ptr, table_ptr, t_ptr, s_ptr, active_ptr, out_ptr, x0_ptr,
    plan_ptr, plan_stride_b, plan_stride_k, plan_k, nfe_ptr, t_next_ptr, active_next_ptr,
    numel, num_alphas, eta_bits, clip_bits,
    DDPM: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    CLIP: tl.constexpr, RETURN_X0: tl.constexpr, PLAN: tl.constexpr, HAS_NFE: tl.constexpr,
    HAS_T_NEXT: tl.constexpr, HAS_ACTIVE_NEXT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Grid (B, G): program (b, j) handles blocks j, j + G, … (``BLOCKS_PER_PROGRAM`` of them,
    the last ones masked) of sample b's ``numel`` elements. Becomes a ``triton.jit`` kernel in
    :func:`_load`. ``eta_bits``/``clip_bits`` are float64 bit patterns (:func:`_float_bits`);
    the flags are compile-time switches. With ``PLAN`` the indices come from the plan (t, s and
    active pointers unused; ``HAS_ACTIVE`` is set, samples with t < 0 being masked) and
    program (b, 0) writes sample b's bookkeeping; ``plan_k`` is a runtime argument."""
    b = tl.program_id(0)
    if PLAN:  # t = plan[b, k], s = plan[b, k+1], active = t >= 0
        row = plan_ptr + b.to(tl.int64) * plan_stride_b
        t = tl.load(row + plan_k * plan_stride_k)
        s = tl.load(row + (plan_k + 1) * plan_stride_k)
        live = t >= 0
        if tl.program_id(1) == 0:  # one program per sample: no race on the read-modify-write of nfe
            if HAS_NFE:
                tl.store(nfe_ptr + b, tl.load(nfe_ptr + b) + live.to(tl.int64))
            if HAS_T_NEXT:  # clamped: a finished sample's next model call indexes a valid embedding
                tl.store(t_next_ptr + b, tl.maximum(s, 0))
            if HAS_ACTIVE_NEXT:
                tl.store(active_next_ptr + b, (s >= 0).to(tl.uint8))
    else:
        t = tl.load(t_ptr + b)
        s = tl.load(s_ptr + b)
        if HAS_ACTIVE:
            live = tl.load(active_ptr + b) != 0
    # ---- per-sample coefficients in float64 (reference.step_coefficients, fused_step_common.h)
    last = num_alphas - 1
    a_t = tl.load(table_ptr + tl.minimum(tl.maximum(t, 0), last))
    a_s = tl.load(table_ptr + tl.minimum(tl.maximum(s, 0), last))
    a_s = tl.where(s >= 0, a_s, 1.0)  # s = CLEAN: the data end, ᾱ = 1
    x0_from_x = 1.0 / tl.sqrt(a_t)
    x0_from_eps = -tl.sqrt(1.0 - a_t) * x0_from_x
    if DDPM:  # posterior q(x_s | x_t, x̂0)
        alpha_ts = a_t / a_s
        beta_ts = 1.0 - alpha_ts
        c_x0 = tl.sqrt(a_s) * beta_ts / (1.0 - a_t)
        c_x = tl.sqrt(alpha_ts) * (1.0 - a_s) / (1.0 - a_t)
        c_eps = 0.0 * a_t
        sigma = tl.sqrt((1.0 - a_s) / (1.0 - a_t) * beta_ts)
    else:  # DDIM, any η
        eta = eta_bits.to(tl.int64).to(tl.float64, bitcast=True)
        var = eta * eta * (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
        rest = 1.0 - a_s - var
        c_x0 = tl.sqrt(a_s)
        c_x = 0.0 * a_t
        c_eps = tl.sqrt(tl.where(rest > 0.0, rest, 0.0))
        sigma = tl.sqrt(var)
    # ---- element-wise update in the input's dtype (float32, or float64)
    dtype = x_ptr.dtype.element_ty
    k0 = x0_from_x.to(dtype)
    k1 = x0_from_eps.to(dtype)
    k2 = c_x0.to(dtype)
    k3 = c_x.to(dtype)
    k4 = c_eps.to(dtype)
    k5 = sigma.to(dtype)
    if CLIP:
        hi = clip_bits.to(tl.int64).to(tl.float64, bitcast=True).to(dtype)
        lo = -hi
    row = b.to(tl.int64) * numel
    for i in range(BLOCKS_PER_PROGRAM):  # 1 unless a sample has more than MAX_GRID_Y blocks
        offs = (tl.program_id(1) + i * tl.num_programs(1)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        if HAS_ACTIVE:  # an inactive sample's ε and z are not read
            live_mask = mask & live
        else:
            live_mask = mask
        ptr = row + offs
        xv = tl.load(x_ptr + ptr, mask=mask)
        ev = tl.load(eps_ptr + ptr, mask=live_mask)
        x0 = k0 * xv + k1 * ev
        if CLIP:  # comparisons, not min/max: NaN propagates like torch.clamp
            x0 = tl.where(x0 < lo, lo, x0)
            x0 = tl.where(x0 > hi, hi, x0)
        xn = k2 * x0 + k3 * xv + k4 * ev
        if HAS_NOISE:
            zv = tl.load(noise_ptr + ptr, mask=live_mask)
            xn = xn + k5 * zv
        if HAS_ACTIVE:  # inactive samples are copied through bit for bit
            xn = tl.where(live, xn, xv)
            x0 = tl.where(live, x0, xv)
        tl.store(out_ptr + ptr, xn, mask=mask)
        if RETURN_X0:
            tl.store(x0_ptr + ptr, x0, mask=mask)


def _grad_probe_kernel(probe_ptr, eps_ptr, v_ptr, out_ptr, numel, step_bits, BLOCK_SIZE: tl.constexpr):
    """Grid (B,): program b sums (ε_probe − ε)² and v² over sample b's ``numel`` elements in the
    dtype of ``out_ptr`` (float32, or float64 for float64 input), block by block, then writes
    √Σ/(h·√Σ) finished in float64 like ``probe_finish`` in csrc/fused_step_common.h
    (no elements: 0/0 = NaN, like the reference). ``step_bits`` is h's float64 bit pattern."""
    b = tl.program_id(0)
    acc = out_ptr.dtype.element_ty
    row = b.to(tl.int64) * numel
    diff2 = tl.zeros([BLOCK_SIZE], dtype=acc)
    v2 = tl.zeros([BLOCK_SIZE], dtype=acc)
    for start in range(0, numel, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        d = tl.load(probe_ptr + row + offs, mask=mask, other=0.0).to(acc) - tl.load(
            eps_ptr + row + offs, mask=mask, other=0.0
        ).to(acc)
        w = tl.load(v_ptr + row + offs, mask=mask, other=0.0).to(acc)
        diff2 += d * d
        v2 += w * w
    step = step_bits.to(tl.int64).to(tl.float64, bitcast=True)
    norm_d = tl.sqrt(tl.sum(diff2, axis=0).to(tl.float64))
    norm_v = tl.sqrt(tl.sum(v2, axis=0).to(tl.float64))
    tl.store(out_ptr + b, (norm_d / (step * norm_v)).to(acc))


def _load():
    """Import triton and turn the kernels above into Triton kernels, once; returns them by name
    ("step", "probe"), or None when triton cannot be imported. Records whether they run
    interpreted: the value of ``TRITON_INTERPRET`` now, which triton reads when a kernel is
    defined."""
    global triton, tl, _fused_step_kernel, _grad_probe_kernel
    if "interpret" in _STATE or "error" in _STATE:
        return _STATE.get("kernels")
    interpret = _interpret_env()
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # not installed, or a broken install
        _STATE["error"] = exc
        return None
    # k varies every step: specialising on it (k = 1, k % 16 = 0) would compile new variants mid-loop
    _fused_step_kernel = triton.jit(do_not_specialize=["eta_bits", "clip_bits", "plan_k"])(_fused_step_kernel)
    _grad_probe_kernel = triton.jit(do_not_specialize=["step_bits"])(_grad_probe_kernel)
    _STATE["kernels"] = {"step": _fused_step_kernel, "probe": _grad_probe_kernel}
    _STATE["interpret"] = interpret
    return _STATE["kernels"]


def triton_importable() -> bool:
    """Whether triton can be imported (without importing it before the first launch)."""
    if "error" in _STATE:
        return False
    if "interpret" in _STATE:
        return True
    if "importable" not in _STATE:  # find_spec walks sys.path: ~100 µs, too much for every dispatch
        _STATE["importable"] = importlib.util.find_spec("triton") is not None
    return _STATE["importable"]


def triton_available(device: torch.device | str) -> bool:
    """Whether the triton backend can run on ``device``: CUDA tensors with triton importable
    (and a GPU present), or CPU tensors under the interpreter (``TRITON_INTERPRET=1`` when
    triton is first loaded here; before that, the variable's current value)."""
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return _STATE.get("interpret", _interpret_env())
    return False


def _float_bits(value: float) -> int:
    """A Python float as the int64 of its IEEE-754 bits: Triton passes float arguments as
    float32, so float64 scalars travel as integers and are bit-cast back in the kernel."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def fused_step_triton(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, s: Tensor, active: Tensor | None,
                      options: StepOptions, return_x0: bool) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """Triton fused step; same contract as :func:`stepdrop.ops.reference.fused_step_reference`.

    Inputs are assumed validated (:func:`stepdrop.ops.validate_step_inputs`); non-contiguous
    ones are copied to contiguous memory here.
    """
    active = None if active is None else active.contiguous().view(torch.uint8)
    return _launch_step(x, eps, alphas_cumprod, options, return_x0, t=t.contiguous(), s=s.contiguous(), active=active)


def fused_plan_step_triton(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, plan: Tensor, k: int, options: StepOptions,
                           outputs: PlanOutputs) -> Tensor:  # fmt: skip
    """Triton plan step; same contract as :func:`stepdrop.ops.reference.fused_plan_step_reference`.

    Inputs are assumed validated (:func:`stepdrop.ops.validate_plan_step_inputs`): the plan is
    read through its strides, the outputs are contiguous and written in place."""
    active_next = None if outputs.active_next is None else outputs.active_next.view(torch.uint8)
    return _launch_step(x, eps, alphas_cumprod, options, False, plan=plan, k=k, nfe=outputs.nfe,
                        t_next=outputs.t_next, active_next=active_next)  # fmt: skip


def _launch_step(x, eps, alphas_cumprod, options: StepOptions, return_x0, *, t=None, s=None, active=None, plan=None,
                 k=0, nfe=None, t_next=None, active_next=None):  # fmt: skip
    """Launch :func:`_fused_step_kernel` on a grid (B, blocks of a sample): the one launcher of
    both steps, indexed by (t, s, active) or by (plan, k). Absent pointers are passed as
    placeholders that the compile-time flags leave unread."""
    kernel = _require(x.device)["step"]
    x = x.contiguous()
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else None
    batch = x.shape[0]
    numel = x.numel() // batch if batch else 0
    bookkeeping = plan is not None and (nfe is not None or t_next is not None or active_next is not None)
    if batch == 0 or (numel == 0 and not bookkeeping):
        return (x_next, x0) if return_x0 else x_next
    eps = eps.contiguous()
    noise = None if options.noise is None else options.noise.contiguous()
    clip = options.clip
    table = alphas_cumprod.to(torch.float64).contiguous()
    blocks = max(1, -(-numel // BLOCK_SIZE))  # at least one program per sample: its bookkeeping
    grid_y = min(blocks, MAX_GRID_Y)
    idx = plan if plan is not None else t  # the placeholder of absent index pointers
    plan_strides = plan.stride() if plan is not None else (0, 1)
    with _on_device(x.device):
        kernel[(batch, grid_y)](
            x, eps, _or(noise, x), table, _or(t, idx), _or(s, idx), _or(active, idx), x_next, _or(x0, x_next),
            idx, *plan_strides, int(k), _or(nfe, idx), _or(t_next, idx), _or(active_next, idx),
            numel, table.numel(), _float_bits(options.eta), _float_bits(0.0 if clip is None else clip),
            DDPM=SOLVERS.index(options.solver) == 1, HAS_NOISE=noise is not None,
            HAS_ACTIVE=active is not None or plan is not None, CLIP=clip is not None, RETURN_X0=return_x0, PLAN=plan is not None, HAS_NFE=nfe is not None,
            HAS_T_NEXT=t_next is not None, HAS_ACTIVE_NEXT=active_next is not None, BLOCK_SIZE=BLOCK_SIZE,
            BLOCKS_PER_PROGRAM=-(-blocks // grid_y),
        )  # fmt: skip
    return (x_next, x0) if return_x0 else x_next


def _or(value: Tensor | None, placeholder: Tensor) -> Tensor:
    return placeholder if value is None else value


def grad_probe_triton(eps_probe: Tensor, eps: Tensor, v: Tensor, step: float) -> Tensor:
    """Triton probe; same contract as :func:`stepdrop.ops.reference.grad_norm_probe`. Inputs are
    assumed validated (:func:`stepdrop.ops.validate_probe_inputs`); non-contiguous ones are
    copied to contiguous memory here."""
    kernel = _require(eps.device)["probe"]
    batch = eps.shape[0]
    out = torch.empty(batch, dtype=torch.float64 if eps.dtype == torch.float64 else torch.float32, device=eps.device)
    if batch == 0:
        return out
    numel = eps.numel() // batch
    with _on_device(eps.device):
        kernel[(batch,)](eps_probe.contiguous(), eps.contiguous(), v.contiguous(), out, numel, _float_bits(step),
                         BLOCK_SIZE=BLOCK_SIZE)  # fmt: skip
    return out


def _require(device: torch.device) -> dict:
    """The kernels, or a RuntimeError saying why triton cannot run on ``device``."""
    kernels = _load()
    if kernels is None:
        raise RuntimeError(f"triton is not available: {_STATE.get('error')}")
    if not triton_available(device):
        raise RuntimeError(
            f"the triton backend cannot run on {device}: it needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    return kernels


def _on_device(device: torch.device):
    """Launch on ``device``'s GPU (Triton launches on the current device's current stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
