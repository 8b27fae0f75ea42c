"""Varlen attention: one function, several interchangeable kernels.

``varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` takes
``q [total_q, heads, head_dim]`` and ``k, v [total_k, heads, head_dim]`` and attends segment ``i``
of the queries (rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``) to segment ``i`` of the keys, with no
mask and no causality: the argument order of flash-attn's ``flash_attn_varlen_func``.

Backends, in the order automatic selection tries them:

- ``fa4``: FlashAttention 4 (``flash-attn-4``, CuTe DSL kernels; Hopper and Blackwell). First
  because it is the fastest measured: on an H200 (sm90, torch 2.11, the ``mixed`` packs of
  BENCHMARKS.md) 232 TFLOP/s at head_dim 72 against 171 for torch's bundled FA2, 259 against 197
  at head_dim 64, and 422 against 214 at head_dim 72 on high-resolution packs, backward included.
  It runs head_dim 72 natively, where FA2 and FA3 pad it to 96.
- ``fa3``: FlashAttention 3 (``flash_attn_interface``, Hopper). Published figures put it level with
  FA4 on Hopper, but it pads head_dim 72 to 96 and its source-only package has not been measured
  beside FA4, so it comes second.
- ``fa2`` (``flash_attn``), ``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``),
  ``aten_flash`` (PyTorch's bundled FA2), ``efficient`` (PyTorch's memory-efficient varlen kernel:
  CUDA, and the one that takes float32), then ``reference`` (exact dense attention per segment, any
  device and dtype). ``dense_sdpa`` runs equal-length segments as one dense batch and is chosen
  automatically only when the caller passes ``uniform_seqlen``.

Selection takes the first backend that supports the device, dtype and head_dim, caches the choice,
and can be overridden with ``backend=`` or the environment variable ``PACKVIT_ATTENTION``. A backend
asked for by name that cannot run raises an error saying why; it never falls back.

FA4 compiles each kernel configuration on first use (seconds per configuration). Set
``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` before ``flash_attn.cute`` is first imported to keep the
compiled kernels on disk across processes (``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` picks the folder);
within a process a new pack composition reuses the compiled kernels (see ``_run_fa4``).

Checks. Every call checks ranks, shapes, dtypes and devices, and that both sides describe the same
number of segments: Python on shapes, no device read. Offsets given on the host (a CPU tensor, or a
``packvit.SegmentLayout``) are also checked value by value, and then copied to q's device by one
non-blocking copy. Offsets already on a CUDA device are not read, since that would make the host
wait for the GPU; for them the caller guarantees what the host check would verify (see
``varlen_attention``), and ``SegmentLayout.from_lengths`` builds offsets that satisfy it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .packing import SegmentLayout, to_device

__all__ = [
    "ENV_VAR",
    "AttentionBackend",
    "BACKENDS",
    "varlen_attention",
    "select_backend",
    "backend_report",
    "fa4_probe",
    "fa4_backward_head_dim",
]

ENV_VAR = "PACKVIT_ATTENTION"
HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_ONLY = (
    "takes float16/bfloat16 only, got {dtype}: cast the model with dtype=torch.bfloat16, "
    "or use backend='efficient' or 'reference' for float32"
)


@dataclass(frozen=True)
class AttentionBackend:
    """A varlen kernel and the conditions under which it runs.

    ``why_not(device, dtype, head_dim)`` returns ``None`` when the kernel can run, else a sentence
    saying why not; ``backward_why_not`` the same for a call whose gradient will be taken (asked
    only where ``why_not`` is ``None``), and ``automatic_backward_why_not`` (by default the same)
    whether the automatic choice gives it such calls; ``run(q, k, v, cu_q, cu_k, max_q, max_k,
    scale)`` returns ``[total_q, H, hd]``.
    """

    name: str
    description: str
    why_not: Callable[[torch.device, torch.dtype, int], str | None]
    run: Callable[..., torch.Tensor]
    backward_why_not: Callable[[torch.device, torch.dtype, int], str | None] = lambda device, dtype, head_dim: None
    automatic_backward_why_not: Callable[[torch.device, torch.dtype, int], str | None] | None = None


# ---------------------------------------------------------------------------------------------
# Availability helpers


@functools.lru_cache(maxsize=None)
def _import_error(module: str, attribute: str | None = None) -> str | None:
    """Why ``module`` (and ``module.attribute``, if given) cannot be imported, or ``None``."""
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # an ImportError, or an undefined symbol from a mismatched wheel
        return f"cannot import {module}: {type(error).__name__}: {error}".splitlines()[0]
    if attribute is not None and not hasattr(imported, attribute):
        # flash-attn-4 installs flash_attn/cute without flash_attn/__init__.py: `flash_attn` then
        # imports as an empty namespace package although FlashAttention 2 is not installed
        return f"{module} has no {attribute}: the package that provides it is not installed"
    return None


def _cuda_why_not(device: torch.device, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, the tensors are on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < min_capability:
        return f"needs compute capability {min_capability[0]}.{min_capability[1]}+, the GPU has {capability[0]}.{capability[1]}"
    return None


def _flash_why_not(
    device, dtype, head_dim, *, module, attribute=None, max_head_dim=256, min_capability=(8, 0), exact_capability=None
):
    reason = _import_error(module, attribute) or _cuda_why_not(device, min_capability)
    if reason:
        return reason
    if exact_capability and torch.cuda.get_device_capability(device)[0] != exact_capability:
        return f"built for compute capability {exact_capability}.x only"
    if dtype not in HALF_DTYPES:
        return HALF_ONLY.format(dtype=dtype)
    if head_dim % 8 or head_dim > max_head_dim:
        return f"needs head_dim a multiple of 8 and at most {max_head_dim}, got {head_dim}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernels


def _run_fa2(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=False)


def _run_fa3(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn_interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out


#: the keyword arguments packvit passes to flash_attn.cute.flash_attn_varlen_func
FA4_KEYWORDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal")


@functools.lru_cache(maxsize=None)
def _fa4_import_error() -> str | None:
    """Why flash-attn-4 cannot serve packvit's call here, or ``None``."""
    reason = _import_error("flash_attn.cute", "flash_attn_varlen_func")
    if reason:
        return f"{reason}; install flash-attn-4 with pip install 'packvit[fa4]'"
    from flash_attn.cute import flash_attn_varlen_func

    missing = [name for name in FA4_KEYWORDS if name not in inspect.signature(flash_attn_varlen_func).parameters]
    if missing:
        try:
            version = importlib.metadata.version("flash-attn-4")
        except importlib.metadata.PackageNotFoundError:
            version = "of unknown version"
        return (
            f"this flash-attn-4 ({version}) takes no {', '.join(missing)}: "
            f"upgrade it to 4.0.0b36 or later with pip install -U 'packvit[fa4]'"
        )
    return None


def _fa4_why_not(device, dtype, head_dim):
    reason = _fa4_import_error()
    if reason:
        return reason
    if device.type != "cuda":
        return f"needs a CUDA device, the tensors are on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10, 11):
        return (
            f"runs on Hopper and Blackwell data-centre GPUs (compute capability 9.0, 10.x or 11.x), "
            f"this GPU has {major}.{minor}: torch_varlen or fa2 serve it"
        )
    if dtype not in HALF_DTYPES:
        return HALF_ONLY.format(dtype=dtype)
    if major == 9 and (head_dim % 8 or head_dim > 256):
        return f"needs head_dim a multiple of 8 and at most 256 on sm90, got {head_dim}"
    if major != 9 and (head_dim % 8 or (head_dim > 128 and head_dim != 256)):
        return f"needs head_dim a multiple of 8 up to 128, or 256, on sm{major}x, got {head_dim}"
    return None


def _call_fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn.cute import flash_attn_varlen_func

    # What flash-attn-4 4.0.0b36 (flash_attn/cute/interface.py) does with this call:
    # - `qv` sits between v and cu_seqlens_q, so everything after v goes by keyword.
    # - max_seqlen_q/k are optional host ints, and none of this path reads a device value on the
    #   host (no .item(), .tolist() or .cpu()): cu_seqlens go to the kernel as they are. Without
    #   a max it bounds every segment by total_q/total_k. On sm90 the ints only choose kernel
    #   variants: a persistent forward when max_seqlen_q fits one tile (192 rows at head_dim <= 96,
    #   128 above), single-block backward kernels when max_seqlen_q/k fit one backward tile.
    # - Kernels are compiled per key: dtype, head_dim, head ratio, whether the LSE is kept (it is
    #   when a gradient is needed), those one-tile cases and whether the pack has more than 256
    #   segments. Token counts and segment lengths are dynamic, so a new pack reuses a kernel.
    # - It returns (out, lse), lse None unless return_lse or a gradient needs it; it is an
    #   autograd.Function, so torch.compile breaks the graph around it.
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, causal=False,
    )
    return out[0] if isinstance(out, tuple) else out


# FA4's backward is not right at every head_dim it runs forward: on sm90, flash-attn-4 4.0.0b36
# rounds the backward's tile head_dim to a multiple of 16 but allocates the dQ accumulator rounded
# to 32, so at 72 or 80 dQ comes back wrong without an error (relative error 1.3 on an H200), and
# at 104 the backward does not compile. Which head dims are right is measured, not assumed: the
# first call that needs a gradient at a head_dim runs a small probe of FA4's forward and backward
# against float32 attention on that GPU (once per process; it compiles the kernels and reads the
# result back, the one host sync of this path). Where the probe fails, q, k and v are zero-padded
# to the next multiple of FA4_BACKWARD_HEAD_DIM_MULTIPLE channels for calls that take a gradient:
# zero channels change no score, the softmax scale stays that of the real head_dim, and the output
# is sliced back. Inference (no gradient) always runs the native head_dim.
#
# Measured on an H200 (flash-attn-4 4.0.0b36, torch 2.11): the probe finds dQ relative error 1.2 at
# head_dim 72 and 80 and a failed build at 104, right at 64, 96 and 128. Forward + backward at head_dim
# 72 over 64 segments of 64 to 1024 tokens took 1.57 ms zero-padded against 1.31 ms on torch's varlen
# FA2 (which pads to 96 itself): the automatic choice therefore gives gradient calls at such head
# dims to the next backend whose backward is right, and the zero-padded run serves a forced fa4.

#: where FA4's backward is wrong at a head_dim, gradient calls run it at the next multiple of this
FA4_BACKWARD_HEAD_DIM_MULTIPLE = 32
#: largest relative error of the probe's output and gradients against float32 that counts as right
FA4_PROBE_TOLERANCE = 5e-2
#: the probe's packs: segments longer than one backward tile (the general kernels), and all within one
FA4_PROBE_LENGTHS = ((300, 77, 1), (17, 64, 2))


def fa4_probe(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` when FA4's forward and backward at ``head_dim`` match float32 attention on ``device``,
    else what is wrong (the largest relative error, or the failure). Compiles kernels and syncs."""
    from .metrics import relative_error

    generator = torch.Generator(device=device).manual_seed(head_dim)
    errors = {}
    for lengths in FA4_PROBE_LENGTHS:
        layout = SegmentLayout.from_lengths(lengths)
        cu = layout.cu_seqlens(device)
        # [T, 2 heads, hd] each, rounded to dtype once so that both sides see the same values
        q, k, v, upstream = (torch.randn(layout.total, 2, head_dim, device=device, generator=generator).to(dtype).float()
                             for _ in range(4))
        results = []
        for leaves, run in (([t.to(dtype).requires_grad_() for t in (q, k, v)], _call_fa4),
                            ([t.clone().requires_grad_() for t in (q, k, v)], _run_reference)):
            try:
                out = run(*leaves, cu, cu, layout.max_seqlen, layout.max_seqlen, None)
                results.append([out, *torch.autograd.grad((out.float() * upstream).sum(), leaves)])
            except Exception as error:  # the kernel compiler's errors have no common type
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                return f"its backward at head_dim {head_dim} fails ({reason})"
        for label, got, expected in zip(("out", "dq", "dk", "dv"), *results):
            errors[label] = max(errors.get(label, 0.0), relative_error(got, expected))
    wrong = {label: error for label, error in errors.items() if not error <= FA4_PROBE_TOLERANCE}
    if wrong:
        found = ", ".join(f"{label} relative error {error:.2g}" for label, error in wrong.items())
        return f"its backward at head_dim {head_dim} is wrong on this GPU ({found} against float32 attention)"
    return None


@functools.lru_cache(maxsize=None)
def _fa4_backward_plan(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[int | None, str]:
    """``(head_dim FA4 runs calls that take a gradient at, or None where none is right; findings)``."""
    on_cuda = device.type == "cuda"
    mode = torch.cuda.get_sync_debug_mode() if on_cuda else 0
    if on_cuda:
        torch.cuda.set_sync_debug_mode(0)  # the probe reads its errors back once
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            native = fa4_probe(device, dtype, head_dim)
            if native is None:
                return head_dim, f"backward right at head_dim {head_dim}"
            padded = -(-head_dim // FA4_BACKWARD_HEAD_DIM_MULTIPLE) * FA4_BACKWARD_HEAD_DIM_MULTIPLE
            if padded == head_dim or padded > 256:
                return None, native
            reason = fa4_probe(device, dtype, padded)
            if reason is None:
                return padded, f"{native}; gradient calls run it zero-padded to head_dim {padded}"
            return None, f"{native}, and {reason}"
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode(mode)


def fa4_backward_head_dim(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> tuple[int | None, str]:
    """The head_dim at which ``fa4`` runs a call that takes a gradient (``head_dim`` itself where
    FA4's backward is right there, else the zero-padded one; ``None`` where neither is right) and
    the probe's findings, measured once per process and GPU."""
    return _fa4_backward_plan(_device(device), dtype, int(head_dim))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _fa4_backward_why_not(device, dtype, head_dim):
    if _capturing(device):
        return "its backward is checked by a probe that cannot run while a CUDA graph is being captured"
    run_at, findings = _fa4_backward_plan(device, dtype, head_dim)
    return None if run_at is not None else findings


def _fa4_automatic_backward_why_not(device, dtype, head_dim):
    reason = _fa4_backward_why_not(device, dtype, head_dim)
    if reason is None and _fa4_backward_plan(device, dtype, head_dim)[0] != head_dim:
        reason = (f"its own backward is wrong at head_dim {head_dim}, and zero-padded it was measured slower than "
                  f"torch's varlen FA2 (see attention.py); backend='fa4' runs it zero-padded")
    return reason


def _run_fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    head_dim = q.shape[-1]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        run_at, _ = _fa4_backward_plan(q.device, q.dtype, head_dim)
        if run_at != head_dim:
            # [T, H, hd] → [T, H, run_at] with zero channels, and the output back to [T, H, hd]
            q, k, v = (F.pad(t, (0, run_at - head_dim)) for t in (q, k, v))
            scale = head_dim**-0.5 if scale is None else scale
            return _call_fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale)[..., :head_dim]
    return _call_fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale)


@functools.lru_cache(maxsize=None)
def _torch_varlen_call() -> Callable | None:
    """``varlen_attn`` wrapped to one calling convention, whatever the torch version."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:  # torch >= 2.11: scale= and window_size=, no is_causal
        def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, -1))
    elif "scale" in parameters:
        def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=scale)
    else:  # torch 2.10 without scale: the default scale only
        def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
                raise ValueError("this torch's varlen_attn has no scale argument; use backend='aten_flash'")
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False)
    return call


def _torch_varlen_why_not(device, dtype, head_dim):
    if _torch_varlen_call() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (added in 2.10)"
    return _flash_why_not(device, dtype, head_dim, module="torch")


def _run_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return _torch_varlen_call()(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def _aten_flash_why_not(device, dtype, head_dim):
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no aten._flash_attention_forward"
    if device.type == "cuda" and not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention kernels"
    return _flash_why_not(device, dtype, head_dim, module="torch")


def _run_aten_flash(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)[0]


def _efficient_why_not(device, dtype, head_dim):
    if not hasattr(torch.ops.aten, "_efficient_attention_forward"):
        return "this torch has no aten._efficient_attention_forward"
    reason = _cuda_why_not(device, (5, 0))
    if reason:
        return reason
    if dtype not in (torch.float32, *HALF_DTYPES):
        return f"takes float32/float16/bfloat16, got {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"needs head_dim a multiple of 8 and at most 256, got {head_dim}"
    return None


def _run_efficient(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    # The kernel takes a batch of one sequence [1, total, H, hd] and the segment offsets; its
    # backward needs the log-sum-exp, so it is computed whenever a gradient may be asked for.
    needs_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = torch.ops.aten._efficient_attention_forward(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu_q, cu_k, max_q, max_k, 0.0, 0, needs_lse, scale=scale
    )[0]
    return out.squeeze(0)


def _dense_why_not(device, dtype, head_dim):
    if device.type != "cuda":
        return "used on CUDA only (on the CPU the reference path is the same computation)"
    return None


def _run_dense(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Equal-length segments as one dense batch: ``[B*n, H, hd]`` viewed as ``[B, H, n, hd]`` for SDPA."""
    batch = q.shape[0] // max_q
    qd, kd, vd = (t.view(batch, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)  # [B, H, n, hd]
    return out.transpose(1, 2).reshape(q.shape)


def _run_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Dense attention per segment. Reads the boundaries on the host: free on the CPU, a sync on CUDA."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outputs = []
    for i in range(len(bounds_q) - 1):
        # [n, H, hd] → [H, n, hd] for SDPA, and back
        qi = q[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1)
        ki = k[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)
        vi = v[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)
        outputs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend
    for backend in [
        AttentionBackend(
            "fa4", "FlashAttention 4 (flash_attn.cute, Hopper/Blackwell; compiles on first use: "
            "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 keeps the kernels on disk)",
            _fa4_why_not, _run_fa4, _fa4_backward_why_not, _fa4_automatic_backward_why_not,
        ),
        AttentionBackend(
            "fa3", "FlashAttention 3 (flash_attn_interface, Hopper)",
            lambda d, t, h: _flash_why_not(
                d, t, h, module="flash_attn_interface", attribute="flash_attn_varlen_func",
                min_capability=(9, 0), exact_capability=9,
            ),
            _run_fa3,
        ),
        AttentionBackend(
            "fa2", "FlashAttention 2 (flash_attn.flash_attn_varlen_func)",
            lambda d, t, h: _flash_why_not(d, t, h, module="flash_attn", attribute="flash_attn_varlen_func"),
            _run_fa2,
        ),
        AttentionBackend(
            "torch_varlen", "torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10)",
            _torch_varlen_why_not, _run_torch_varlen,
        ),
        AttentionBackend(
            "aten_flash", "torch.ops.aten._flash_attention_forward (PyTorch's bundled FA2)",
            _aten_flash_why_not, _run_aten_flash,
        ),
        AttentionBackend(
            "efficient", "torch.ops.aten._efficient_attention_forward (varlen, float32 on CUDA)",
            _efficient_why_not, _run_efficient,
        ),
        AttentionBackend(
            "dense_sdpa", "F.scaled_dot_product_attention on equal-length segments as a dense batch (cuDNN on Hopper)",
            _dense_why_not, _run_dense,
        ),
        AttentionBackend(
            "reference", "dense SDPA per segment (exact; CPU or any dtype, the float32 reference)",
            lambda d, t, h: None, _run_reference,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Selection


def _is_count(x) -> bool:
    """A whole number known on the host: a Python or numpy integer, not a bool or a tensor."""
    return type(x) is int or isinstance(x, np.integer)


def _check_format(dtype: torch.dtype, head_dim: int) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"attention takes floating-point q, k and v (float16, bfloat16 or float32), got {dtype}; "
            f"cast them, e.g. q.to(torch.bfloat16)"
        )
    if not _is_count(head_dim) or head_dim <= 0:
        raise ValueError(
            f"head_dim must be a positive integer (the size of the last dimension of q, k and v: "
            f"hidden size / heads), got {head_dim!r}"
        )


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def backend_report(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> dict[str, str | None]:
    """For each backend, ``None`` if it runs on (device, dtype, head_dim), else why not.

    Raises ``ValueError`` for a dtype that is not floating point or a head_dim that is not a
    positive integer.
    """
    _check_format(dtype, head_dim)
    device = torch.device(device)
    return {name: backend.why_not(device, dtype, int(head_dim)) for name, backend in BACKENDS.items()}


def _requested_backend(backend: str | None) -> str | None:
    name = backend or os.environ.get(ENV_VAR) or None
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        source = "backend=" if backend else f"{ENV_VAR}="
        raise ValueError(f"unknown attention backend {source}{name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    return name


def _automatic_why_not(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool) -> str | None:
    """Why the automatic choice passes over a backend for these inputs, or ``None``."""
    backend = BACKENDS[name]
    reason = backend.why_not(device, dtype, head_dim)
    if reason is None and backward:
        reason = (backend.automatic_backward_why_not or backend.backward_why_not)(device, dtype, head_dim)
    return reason


@functools.lru_cache(maxsize=None)
def _auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int, uniform: bool, backward: bool) -> str:
    if uniform and dtype in HALF_DTYPES and _automatic_why_not("dense_sdpa", device, dtype, head_dim, backward) is None:
        return "dense_sdpa"
    for name in BACKENDS:
        if name != "dense_sdpa" and _automatic_why_not(name, device, dtype, head_dim, backward) is None:
            return name
    raise AssertionError("the reference backend runs everywhere")


def _select(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None, uniform: bool,
            backward: bool) -> str:
    name = _requested_backend(backend)
    if name is None:
        if backward and _capturing(device):
            return _auto_backend.__wrapped__(device, dtype, head_dim, uniform, backward)  # never cache this case
        return _auto_backend(device, dtype, head_dim, uniform, backward)
    if name == "dense_sdpa" and not uniform:
        raise ValueError(
            "attention backend 'dense_sdpa' needs segments of one length (pass uniform_seqlen); "
            "choose a varlen backend for segments of different lengths"
        )
    reason = BACKENDS[name].why_not(device, dtype, head_dim)
    action = "run"
    if reason is None and backward:
        reason, action = BACKENDS[name].backward_why_not(device, dtype, head_dim), "take gradients"
    if reason:
        raise ValueError(
            f"attention backend {name!r} cannot {action} on {device.type} {dtype} head_dim {head_dim}: {reason}"
        )
    return name


def select_backend(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str | None = None, uniform: bool = False,
    backward: bool = False,
) -> str:
    """The backend ``varlen_attention`` uses for these inputs (argument, then environment, then auto).

    ``uniform``: every query and key segment has the same length, so the dense kernels qualify.
    ``backward``: the call's gradient will be taken, so the backend's backward must be right too.
    Raises ``ValueError`` for a dtype that is not floating point or a head_dim that is not a
    positive integer, and for a named backend that cannot run here.
    """
    _check_format(dtype, head_dim)
    return _select(_device(device), dtype, int(head_dim), backend, uniform, backward)


# ---------------------------------------------------------------------------------------------
# Checks


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim], got {shape}")
    q_shape, k_shape = q.shape, k.shape
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    if q_shape[1] != k_shape[1] or q_shape[2] != k_shape[2]:
        raise ValueError(f"q and k must agree on (heads, head_dim), got {tuple(q_shape[1:])} and {tuple(k_shape[1:])}")
    if q_shape[1] == 0:
        raise ValueError(
            f"q, k and v have no heads: [total_tokens, heads, head_dim] = {tuple(q_shape)}; "
            f"reshape them to heads = hidden size / head_dim"
        )
    dtype, device = q.dtype, q.device
    if not (dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {dtype}, {k.dtype}, {v.dtype}; cast them together")
    if not (device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {device}, {k.device}, {v.device}")
    _check_format(dtype, q_shape[2])


def _offsets(side: str, cu_seqlens, x: torch.Tensor, max_seqlen) -> tuple[torch.Tensor, int, np.ndarray | None]:
    """Checks one side's offsets (``side`` "q" or "k", ``x`` its tensor).

    Returns the offsets on ``x``'s device, ``max_seqlen`` as an int (on the host it defaults to
    the longest segment), and the segment lengths when the offsets were on the host, else None.
    """
    name = f"cu_seqlens_{side}"
    if isinstance(cu_seqlens, SegmentLayout):
        cu_seqlens = cu_seqlens.cu_seqlens_host
    cu, device = cu_seqlens, x.device
    if (
        not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1
        or not (cu.is_cpu or cu.device == device) or not cu.is_contiguous()
    ):
        got = f"{cu.dtype} {tuple(cu.shape)} on {cu.device}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(
            f"{name} must be a contiguous 1-D int32 tensor on {device} or the CPU, or a packvit.SegmentLayout, "
            f"got {got}; build it with packvit.SegmentLayout.from_lengths(lengths), or "
            f"torch.cumsum(..., dtype=torch.int32)"
        )
    segments, rows = cu.shape[0] - 1, x.shape[0]
    if segments < 1:
        raise ValueError(
            f"{name} has {cu.shape[0]} entries, but the offsets of n segments have n + 1, from 0 to the token "
            f"count ([0, {rows}] for one segment); build them with packvit.SegmentLayout.from_lengths(lengths)"
        )
    if max_seqlen is not None and (not _is_count(max_seqlen) or max_seqlen < 0):
        raise ValueError(
            f"max_seqlen_{side} must be a non-negative Python int, the longest segment's length known on the "
            f"host, got {max_seqlen!r}; pass SegmentLayout.max_seqlen (reading a device tensor would make "
            f"every call wait for the GPU)"
        )
    if not cu.is_cpu:
        if max_seqlen is None:
            raise ValueError(
                f"max_seqlen_{side} is needed with {name} on {cu.device}: pass the longest segment's length "
                f"(SegmentLayout.max_seqlen), or pass the offsets on the host (a CPU tensor or the "
                f"SegmentLayout) to have it computed"
            )
        if max_seqlen * segments < rows:
            raise ValueError(
                f"max_seqlen_{side} {max_seqlen} is less than the longest segment: {segments} segments of at "
                f"most {max_seqlen} tokens cannot hold the {rows} rows of {side}; pass the longest segment's "
                f"length (SegmentLayout.max_seqlen)"
            )
        return cu, int(max_seqlen), None

    offsets = cu.numpy()
    lengths = np.diff(offsets.astype(np.int64))
    if offsets[0] != 0:
        raise ValueError(
            f"{name} starts at {offsets[0]}, not 0: offsets are [0, n0, n0 + n1, ...]; build them with "
            f"packvit.SegmentLayout.from_lengths(lengths)"
        )
    if (lengths < 0).any():
        i = int(np.argmax(lengths < 0))
        raise ValueError(
            f"{name} decreases from {offsets[i]} to {offsets[i + 1]} (entries {i} and {i + 1}): offsets are "
            f"running totals of segment lengths and never decrease; build them with "
            f"packvit.SegmentLayout.from_lengths(lengths)"
        )
    if offsets[-1] != rows:
        raise ValueError(
            f"{name} ends at {offsets[-1]} but {side} has {rows} rows: the last offset is the token count, "
            f"so these offsets describe another pack; pass the offsets built for this {side}"
        )
    longest = int(lengths.max())
    if max_seqlen is None:
        max_seqlen = longest
    elif longest > max_seqlen:
        raise ValueError(
            f"max_seqlen_{side} {max_seqlen} is less than the longest segment of {side} ({longest} tokens, "
            f"segment {int(np.argmax(lengths))}), and the kernels would leave the rows past it unset; pass "
            f"the longest length (SegmentLayout.max_seqlen) or any larger bound"
        )
    return to_device(cu, device), int(max_seqlen), lengths


def _check_uniform(uniform_seqlen, segments: int, rows_q: int, rows_k: int, max_seqlen_q: int) -> None:
    if not _is_count(uniform_seqlen) or uniform_seqlen <= 0:
        raise ValueError(
            f"uniform_seqlen must be a positive integer, the one length of every segment, got "
            f"{uniform_seqlen!r}; leave it None when the segments differ in length"
        )
    expected = uniform_seqlen * segments
    if rows_q != expected or rows_k != expected or max_seqlen_q != uniform_seqlen:
        raise ValueError(
            f"uniform_seqlen {uniform_seqlen} does not describe {rows_q} query and {rows_k} key tokens in "
            f"{segments} segments with max_seqlen {max_seqlen_q}; pass it only when every segment has that length"
        )


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, uniform_seqlen):
    """Checks a call; returns ``(backend name, cu_q, cu_k, max_q, max_k)`` with the offsets on q's device."""
    _check_tensors(q, k, v)
    cu_q, max_q, lengths_q = _offsets("q", cu_seqlens_q, q, max_seqlen_q)
    cu_k, max_k, lengths_k = _offsets("k", cu_seqlens_k, k, max_seqlen_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got "
            f"{cu_q.shape[0] - 1} and {cu_k.shape[0] - 1}"
        )
    if lengths_q is not None and lengths_k is not None:
        keyless = (lengths_q > 0) & (lengths_k == 0)
        if keyless.any():
            i = int(np.argmax(keyless))
            raise ValueError(
                f"query segment {i} has {lengths_q[i]} tokens but key segment {i} is empty, and attention over "
                f"no keys is undefined; give every segment that has queries at least one key"
            )
    uniform = uniform_seqlen is not None
    if uniform:
        _check_uniform(uniform_seqlen, cu_q.shape[0] - 1, q.shape[0], k.shape[0], max_q)
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _select(q.device, q.dtype, q.shape[2], backend, uniform, backward), cu_q, cu_k, max_q, max_k


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | SegmentLayout,
    cu_seqlens_k: torch.Tensor | SegmentLayout,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    uniform_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention within segments: ``q [Tq, H, hd]``, ``k, v [Tk, H, hd]`` → ``[Tq, H, hd]``.

    ``cu_seqlens_*`` are the segment offsets ``[N + 1]`` int32, ``[0, n0, n0 + n1, ..., T]``, given
    as a tensor on q's device, a CPU tensor, or a ``packvit.SegmentLayout``. ``max_seqlen_*`` are
    Python ints, the longest segment's length (an upper bound is fine); with offsets on the host
    they may be left out and are then computed. ``scale`` defaults to ``head_dim ** -0.5``.
    ``uniform_seqlen``, when the caller knows on the host that every query and key segment has
    exactly this length, lets the automatic selection run the segments as one dense batch
    (``dense_sdpa``).

    Offsets on the host are checked in full: they start at 0, never decrease, end at the row count
    of q (resp. k); ``max_seqlen_*`` is at least the longest segment; both sides have the same
    number of segments, and every query segment has at least one key. They are then copied to
    q's device by one non-blocking copy per call: a caller that runs many layers over one pack
    copies them once (``SegmentLayout.cu_seqlens(device)``) and passes the device tensor.

    Offsets on a CUDA device are not read. Their dtype, shape and device are checked, as is that
    ``max_seqlen * num_segments`` covers the rows and that ``uniform_seqlen * num_segments`` equals
    them; the rest is then the caller's responsibility: the offsets start at 0, never decrease,
    end at the row counts, no segment is longer than ``max_seqlen_*``, every query segment has
    keys, and under ``uniform_seqlen`` every segment has that length. Offsets that break this give
    NaN or garbage rows, not an error. ``SegmentLayout.from_lengths`` builds offsets that satisfy
    it, and packvit's models pass those.
    """
    name, cu_q, cu_k, max_q, max_k = _prepare(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, uniform_seqlen
    )
    return BACKENDS[name].run(q, k, v, cu_q, cu_k, max_q, max_k, scale)
