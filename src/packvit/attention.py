"""Varlen attention: one function, several interchangeable kernels.

``varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` takes
``q [total_q, heads, head_dim]`` and ``k, v [total_k, heads, head_dim]`` and attends segment ``i``
of the queries (rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``) to segment ``i`` of the keys, with no
mask and no causality: the argument order of flash-attn's ``flash_attn_varlen_func``.

Backends, fastest first: ``fa3``, ``fa4``, ``fa2`` (flash-attn packages), ``torch_varlen``
(``torch.nn.attention.varlen.varlen_attn``), ``aten_flash`` (PyTorch's bundled flash kernel),
``efficient`` (PyTorch's memory-efficient varlen kernel; CUDA, takes float32), and ``reference``
(exact dense attention per segment, any device and dtype). Automatic selection takes the first
backend that supports the device, dtype and head_dim, caches the choice, and can be overridden
with ``backend=`` or the environment variable ``PACKVIT_ATTENTION``. A backend asked for by name
that cannot run raises an error saying why; it never falls back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ENV_VAR",
    "AttentionBackend",
    "BACKENDS",
    "varlen_attention",
    "select_backend",
    "backend_report",
]

ENV_VAR = "PACKVIT_ATTENTION"
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """A varlen kernel and the conditions under which it runs.

    ``why_not(device, dtype, head_dim)`` returns ``None`` when the kernel can run, else a sentence
    saying why not; ``run(q, k, v, cu_q, cu_k, max_q, max_k, scale)`` returns ``[total_q, H, hd]``.
    """

    name: str
    description: str
    why_not: Callable[[torch.device, torch.dtype, int], str | None]
    run: Callable[..., torch.Tensor]
    has_backward: bool = True


# ---------------------------------------------------------------------------------------------
# Availability helpers


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # an ImportError, or an undefined symbol from a mismatched wheel
        return f"cannot import {module}: {type(error).__name__}: {error}".splitlines()[0]
    return None


def _cuda_why_not(device: torch.device, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, the tensors are on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < min_capability:
        return f"needs compute capability {min_capability[0]}.{min_capability[1]}+, the GPU has {capability[0]}.{capability[1]}"
    return None


def _flash_why_not(device, dtype, head_dim, *, module, max_head_dim=256, min_capability=(8, 0), exact_capability=None):
    reason = _import_error(module) or _cuda_why_not(device, min_capability)
    if reason:
        return reason
    if exact_capability and torch.cuda.get_device_capability(device)[0] != exact_capability:
        return f"built for compute capability {exact_capability}.x only"
    if dtype not in HALF_DTYPES:
        return f"takes float16/bfloat16 only, got {dtype}: cast the model with dtype=torch.bfloat16, or use backend='efficient' or 'reference' for float32"
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


def _run_fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn.cute import flash_attn_varlen_func

    # FA4 takes qv before the cu_seqlens: everything by keyword.
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, causal=False,
    )
    return out[0] if isinstance(out, tuple) else out


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
            "fa3", "FlashAttention 3 (flash_attn_interface, Hopper)",
            lambda d, t, h: _flash_why_not(d, t, h, module="flash_attn_interface", min_capability=(9, 0), exact_capability=9),
            _run_fa3,
        ),
        AttentionBackend(
            "fa4", "FlashAttention 4 (flash_attn.cute, Hopper/Blackwell)",
            lambda d, t, h: _flash_why_not(d, t, h, module="flash_attn.cute", min_capability=(9, 0)),
            _run_fa4,
        ),
        AttentionBackend(
            "fa2", "FlashAttention 2 (flash_attn.flash_attn_varlen_func)",
            lambda d, t, h: _flash_why_not(d, t, h, module="flash_attn"),
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


def backend_report(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> dict[str, str | None]:
    """For each backend, ``None`` if it runs on (device, dtype, head_dim), else why not."""
    device = torch.device(device)
    return {name: backend.why_not(device, dtype, head_dim) for name, backend in BACKENDS.items()}


def _requested_backend(backend: str | None) -> str | None:
    name = backend or os.environ.get(ENV_VAR) or None
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        source = "backend=" if backend else f"{ENV_VAR}="
        raise ValueError(f"unknown attention backend {source}{name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    return name


@functools.lru_cache(maxsize=None)
def _auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int, uniform: bool = False) -> str:
    if uniform and dtype in HALF_DTYPES and BACKENDS["dense_sdpa"].why_not(device, dtype, head_dim) is None:
        return "dense_sdpa"
    for name, backend in BACKENDS.items():
        if name != "dense_sdpa" and backend.why_not(device, dtype, head_dim) is None:
            return name
    raise AssertionError("the reference backend runs everywhere")


def select_backend(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str | None = None, uniform: bool = False
) -> str:
    """The backend ``varlen_attention`` uses for these inputs (argument, then environment, then auto).

    ``uniform``: every query and key segment has the same length, so the dense kernels qualify.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = _requested_backend(backend)
    if name is None:
        return _auto_backend(device, dtype, head_dim, uniform)
    if name == "dense_sdpa" and not uniform:
        raise ValueError(
            "attention backend 'dense_sdpa' needs segments of one length (pass uniform_seqlen); "
            "choose a varlen backend for segments of different lengths"
        )
    reason = BACKENDS[name].why_not(device, dtype, head_dim)
    if reason:
        raise ValueError(
            f"attention backend {name!r} cannot run on {device.type} {dtype} head_dim {head_dim}: {reason}"
        )
    return name


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim], got {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must agree on (heads, head_dim), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them together")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(
                f"{name} must be a 1-D int32 tensor on {q.device}, got {cu.dtype} {tuple(cu.shape)} on "
                f"{cu.device}; build it with packvit.SegmentLayout, or torch.cumsum(..., dtype=torch.int32)"
            )
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}"
        )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    backend: str | None = None,
    uniform_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention within segments: ``q [Tq, H, hd]``, ``k, v [Tk, H, hd]`` → ``[Tq, H, hd]``.

    ``cu_seqlens_*`` are int32 offsets on the tensors' device; ``max_seqlen_*`` Python ints (an
    upper bound is fine). ``scale`` defaults to ``head_dim ** -0.5``. ``uniform_seqlen``, when the
    caller knows on the host that every query and key segment has exactly this length, lets the
    automatic selection run the segments as one dense batch (``dense_sdpa``).
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k)
    uniform = uniform_seqlen is not None
    if uniform and (q.shape[0] != k.shape[0] or q.shape[0] % uniform_seqlen or max_seqlen_q != uniform_seqlen):
        raise ValueError(
            f"uniform_seqlen {uniform_seqlen} does not describe {q.shape[0]} query and {k.shape[0]} key tokens "
            f"with max_seqlen {max_seqlen_q}; pass it only when every segment has that length"
        )
    name = select_backend(q.device, q.dtype, q.shape[-1], backend, uniform)
    return BACKENDS[name].run(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale)
