"""Triton backend of the fused sampling step (the "triton" backend of :mod:`stepdrop.ops`).

One program per (sample, block of that sample's elements): it loads the sample's t, s and
active flag, gathers ᾱ_t, ᾱ_s from the float64 table (indices clamped, so masked or bad
entries never read out of bounds; s < 0 gives ᾱ_s = 1), computes the per-sample
coefficients of :func:`stepdrop.ops.reference.step_coefficients` in float64 (the formulas of
``csrc/fused_step_common.h``, operation by operation), then the element-wise update in the
input's dtype (float32, or float64 for float64 input). Same contract as
:func:`stepdrop.ops.reference.fused_step_reference`; inputs reach it validated by
:func:`stepdrop.ops.validate_step_inputs`.

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

BLOCK_SIZE = 1024
"""Elements of one sample handled by one program (the tail block is masked)."""
MAX_GRID_Y = 65535
"""CUDA's limit on the second grid dimension; longer samples loop over their blocks."""

_STATE: dict = {}  # filled by _load(): "kernel" and "interpret", or "error"
triton = tl = None  # the modules, bound by _load(): importing triton is deferred to the first launch


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _fused_step_kernel(
    x_ptr, eps_ptr, noise_ptr, table_ptr, t_ptr, s_ptr, active_ptr, out_ptr, x0_ptr,
    numel, num_alphas, eta_bits, clip_bits,
    DDPM: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    CLIP: tl.constexpr, RETURN_X0: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Grid (B, G): program (b, j) handles blocks j, j + G, … (``BLOCKS_PER_PROGRAM`` of them,
    the last ones masked) of sample b's ``numel`` elements. Becomes a ``triton.jit`` kernel in
    :func:`_load`. ``eta_bits``/``clip_bits`` are float64 bit patterns (:func:`_float_bits`);
    the flags are compile-time switches."""
    b = tl.program_id(0)
    # ---- per-sample coefficients in float64 (reference.step_coefficients, fused_step_common.h)
    t = tl.load(t_ptr + b)
    s = tl.load(s_ptr + b)
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
    if HAS_ACTIVE:
        live = tl.load(active_ptr + b) != 0
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


def _load():
    """Import triton and turn :func:`_fused_step_kernel` into a Triton kernel, once; None when
    triton cannot be imported. Records whether it runs interpreted: the value of
    ``TRITON_INTERPRET`` now, which triton reads when a kernel is defined."""
    global triton, tl, _fused_step_kernel
    if "interpret" in _STATE or "error" in _STATE:
        return _STATE.get("kernel")
    interpret = _interpret_env()
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # not installed, or a broken install
        _STATE["error"] = exc
        return None
    _fused_step_kernel = triton.jit(do_not_specialize=["eta_bits", "clip_bits"])(_fused_step_kernel)
    _STATE["kernel"] = _fused_step_kernel
    _STATE["interpret"] = interpret
    return _fused_step_kernel


def triton_importable() -> bool:
    """Whether triton can be imported (without importing it before the first launch)."""
    if "error" in _STATE:
        return False
    if "interpret" in _STATE:
        return True
    return importlib.util.find_spec("triton") is not None


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


def fused_step_triton(
    x: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    noise: Tensor | None,
    active: Tensor | None,
    solver: str,
    eta: float,
    clip: float | None,
    return_x0: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton fused step; same contract as :func:`stepdrop.ops.reference.fused_step_reference`.

    Inputs are assumed validated (:func:`stepdrop.ops.validate_step_inputs`); non-contiguous
    ones are copied to contiguous memory here.
    """
    kernel = _load()
    if kernel is None:
        raise RuntimeError(f"triton is not available: {_STATE.get('error')}")
    if not triton_available(x.device):
        raise RuntimeError(
            f"the triton backend cannot run on {x.device}: it needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    x = x.contiguous()
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else None
    batch = x.shape[0]
    numel = x.numel() // batch if batch else 0
    if batch == 0 or numel == 0:
        return (x_next, x0) if return_x0 else x_next
    eps = eps.contiguous()
    noise = None if noise is None else noise.contiguous()
    table = alphas_cumprod.to(torch.float64).contiguous()
    t, s = t.contiguous(), s.contiguous()
    active = None if active is None else active.contiguous().view(torch.uint8)
    blocks = -(-numel // BLOCK_SIZE)
    grid_y = min(blocks, MAX_GRID_Y)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        kernel[(batch, grid_y)](
            x, eps, noise if noise is not None else x, table, t, s, active if active is not None else t,
            x_next, x0 if x0 is not None else x_next,
            numel, table.numel(), _float_bits(eta), _float_bits(0.0 if clip is None else clip),
            DDPM=SOLVERS.index(solver) == 1, HAS_NOISE=noise is not None, HAS_ACTIVE=active is not None,
            CLIP=clip is not None, RETURN_X0=return_x0, BLOCK_SIZE=BLOCK_SIZE,
            BLOCKS_PER_PROGRAM=-(-blocks // grid_y),
        )  # fmt: skip
    return (x_next, x0) if return_x0 else x_next

