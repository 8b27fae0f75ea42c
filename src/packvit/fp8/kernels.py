"""The row quantisation of ``packvit.fp8.quantize`` as one Triton kernel (CUDA).

One program per row reads the row once (applying the MLP's activation, and its gate, on the way),
reduces its maximum in registers and writes the e4m3 row and its scale: about the memory traffic
of one copy. Measured on an H200, 32768 rows of bf16: 0.039 ms at 1152 columns and 0.136 ms at
4304, against 0.426 and 1.498 ms for the same operations run one by one in eager PyTorch and
0.125 and 0.317 ms compiled by torch.compile (whose reduction over more than 1024 columns is a
loop over memory).

The kernel is a ``torch.library.triton_op``: it runs eagerly, inside compiled layers (the compiler
calls it as it is) and inside captured CUDA graphs. NaN follows the rule of ``quantize_rows``:
the row maximum and its clamps propagate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .quantize import E4M3, E4M3_MAX, FLOAT32_MAX, MIN_AMAX

__all__ = ["quantize_rows_cuda"]

# the format's constants as the kernel reads them (Triton takes globals only as constexpr)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_FLOAT32_MAX = tl.constexpr(FLOAT32_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    """The codes of ``ACTIVATION_CODES``: identity, gelu (erf), gelu (tanh), quick_gelu, silu."""
    if ACTIVATION == 1:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) = 2 * sigmoid(2u)
    elif ACTIVATION == 3:
        v = v * tl.sigmoid(1.702 * v)
    elif ACTIVATION == 4:
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, width, x_row_stride,
                          BLOCK: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < width
    x_row = x_ptr + row * x_row_stride
    v = _activate(tl.load(x_row + columns, mask=inside, other=0.0).to(tl.float32), ACTIVATION)
    if GATED:  # the row is [gate | up]: act(gate) * up
        v = v * tl.load(x_row + width + columns, mask=inside, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(v), 0, _max_with_nan)
    amax = tl.maximum(amax, _MIN_AMAX, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.minimum(amax, _FLOAT32_MAX, propagate_nan=tl.PropagateNan.ALL) / _E4M3_MAX
    y = v / scale
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX))
    tl.store(q_ptr + row * width + columns, y.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton_op("packvit::fp8_quantize_rows", mutates_args=())
def quantize_rows_cuda(x: torch.Tensor, width: int, block: int, activation: int, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, width]`` (gated: ``[M, 2 * width]``, last dimension contiguous) → ``(q [M, width]
    e4m3, scale [M, 1] float32)``; ``block``: ``width`` rounded up to a power of two;
    ``activation``: a code of ``ACTIVATION_CODES``."""
    rows = x.shape[0]
    q = torch.empty((rows, width), device=x.device, dtype=E4M3)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    wrap_triton(_quantize_rows_kernel)[(rows,)](
        x, q, scale, width, x.stride(0), BLOCK=block, ACTIVATION=activation, GATED=gated,
        num_warps=4 if block <= 2048 else 8,
    )
    return q, scale
