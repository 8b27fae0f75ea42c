"""Batch-invariant versions of the operations whose result for a row can depend on the other rows.

- Matrix products (``linear``, ``matmul``). On the CPU every product runs on blocks of exactly
  ``ROW_BLOCK`` rows (the last one padded with zero rows), copied into a fresh buffer, as one
  batched product: every block is the same call shape, so a row goes through the same kernel path
  whether the pack has 1 row or 100 000 (torch's CPU matmul is not row-invariant: MKL takes
  another path for a few rows than for many). On CUDA, ``packvit.batch_invariant.kernels``.
- Row means (``row_mean``, RMSNorm's) and ``normalize_rows``: torch's CPU reductions over a row of
  fewer than ``CPU_ROW_LIMIT`` values are per row already; on CUDA torch's reduction kernels pick
  their split from the tensor's shape, so the Triton row sum serves instead.
- Activations on the CPU (``gelu``, ``silu``, ``sigmoid``): torch's vectorised CPU kernels compute
  the elements at the end of a vector loop (and of each thread's share) with a scalar formula that
  rounds differently, so an element's value depends on where it sits in the tensor. Here they are
  composed of ``exp`` and ``erfc`` (mapped over the whole tensor by one vector function, its tail
  included) and IEEE arithmetic, whose results are position-independent. On CUDA every
  element runs the same device code: torch's activations are used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ROW_BLOCK", "CPU_ROW_LIMIT", "require_kernels", "check_cpu_row", "linear", "matmul", "row_mean",
           "normalize_rows", "gelu", "silu", "sigmoid"]

#: rows per block of a CPU matrix product
ROW_BLOCK = 64
#: the longest row a CPU row reduction serves per row (ATen's parallel grain: longer rows are split
#: between threads)
CPU_ROW_LIMIT = 32768


def check_cpu_row(width: int) -> None:
    """Refuses a CPU row reduction over ``width`` values that torch would split between threads."""
    if width >= CPU_ROW_LIMIT:
        raise ValueError(
            f"batch-invariant mode reduces rows of fewer than {CPU_ROW_LIMIT} values on the CPU (torch splits longer "
            f"rows between threads), got rows of {width}"
        )


def require_kernels():
    """``packvit.batch_invariant.kernels``, or an ``ImportError`` naming Triton."""
    try:
        from . import kernels
    except ImportError as error:
        raise ImportError(
            f"batch-invariant mode on CUDA runs Triton kernels and Triton cannot be imported ({error}); install "
            f"the triton that matches this torch (CUDA builds of torch ship it): pip install triton"
        ) from None
    return kernels


def _cpu_blocked_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a [M, K] @ b [K, N] (+ bias)`` on the CPU, ``ROW_BLOCK`` rows per block → ``[M, N]``."""
    (rows, k), n = a.shape, b.shape[1]
    blocks = -(-rows // ROW_BLOCK)
    if blocks == 0:
        return a.new_zeros(0, n)
    # [M, K] → a fresh [blocks * ROW_BLOCK, K] (zero rows at the end) → [blocks, ROW_BLOCK, K]
    padded = torch.cat([a, a.new_zeros(blocks * ROW_BLOCK - rows, k)]).view(blocks, ROW_BLOCK, k)
    weights = b.expand(blocks, k, n)
    if bias is None:
        out = torch.bmm(padded, weights)
    else:
        out = torch.baddbmm(bias.view(1, 1, n).expand(blocks, ROW_BLOCK, n), padded, weights)
    return out.view(blocks * ROW_BLOCK, n)[:rows]  # [blocks, ROW_BLOCK, N] → [M, N]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, gelu_tanh: bool = False) -> torch.Tensor:
    """``a [..., K] @ b [K, N] (+ bias [N])`` → ``[..., N]``, each row independent of the others.

    ``gelu_tanh``: the tanh GELU of the result (on CUDA in the product's epilogue). Under autocast the
    operands are cast to the autocast dtype first, as torch's products are.
    """
    if b.dim() != 2 or a.dim() < 1 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"the invariant matrix product takes [..., K] x [K, N], got {tuple(a.shape)} x {tuple(b.shape)}")
    cast = _autocast_dtype(a.device)
    if cast is not None:
        a, b, bias = (t.to(cast) if t is not None else None for t in (a, b, bias))
    leading = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])  # [..., K] → [M, K]
    if a.device.type == "cuda":
        out = require_kernels().matmul(a2, b, bias, gelu_tanh=gelu_tanh)
    elif a.device.type == "cpu":
        out = _cpu_blocked_matmul(a2, b, bias)
        if gelu_tanh:
            out = gelu(out, "tanh")
    else:
        raise ValueError(f"batch-invariant mode runs on the CPU and on CUDA GPUs, not on {a.device.type}")
    return out.reshape(*leading, b.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` → ``[..., N]``, row-invariant."""
    return matmul(x, weight.t(), bias)


def row_mean(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The mean over the last dimension, each row's independent of the other rows: ``[..., D]`` →
    ``[...]`` (``[..., 1]`` with ``keepdim``)."""
    width = x.shape[-1]
    if x.device.type == "cuda":
        mean = require_kernels().row_mean(x.reshape(-1, width)).reshape(x.shape[:-1])
        return mean.unsqueeze(-1) if keepdim else mean
    check_cpu_row(width)
    return x.mean(-1, keepdim=keepdim)


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``: each row over its L2 norm (at least ``eps``), row-invariant."""
    if x.device.type != "cuda":
        check_cpu_row(x.shape[-1])
        return F.normalize(x, dim=-1, eps=eps)
    width = x.shape[-1]
    squares = require_kernels().row_sum((x.float() * x.float()).reshape(-1, width)).reshape(*x.shape[:-1], 1)
    return x / squares.sqrt().clamp_min(eps).to(x.dtype)


_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))``."""
    return torch.reciprocal(1 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``."""
    return x * sigmoid(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu``: ``0.5 x erfc(-x / sqrt 2)`` (= ``0.5 x (1 + erf(x / sqrt 2))`` without its
    cancellation for negative x), or with ``approximate="tanh"`` ``x sigmoid(2u)`` (= ``0.5 x
    (1 + tanh u)``), ``u = sqrt(2 / pi) (x + 0.044715 x^3)``."""
    if approximate == "tanh":
        return x * sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x)))
    if approximate != "none":
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return 0.5 * x * torch.erfc(x * -_SQRT_HALF)
