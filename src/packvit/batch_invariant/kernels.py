"""The CUDA kernels of batch-invariant mode, in Triton: a matrix product and a row sum whose
result for a row depends on that row alone.

The matrix product tiles the output ``[M, N]`` in ``BLOCK_M x BLOCK_N`` tiles, walked by a fixed
number of persistent programs; each tile runs its whole reduction over K itself, block after
block of ``BLOCK_K`` in one order (no split of K), and adds the bias (and, where asked, the tanh
GELU) in fp32 before the one rounding to the output dtype. The tiling is fixed per (dtype, K, N)
and never reads M, and M is not a compile-time specialisation (``do_not_specialize``): a row
goes through the same instructions whether the product has 1 row or 100 000, wherever it sits,
and rows past M in a tile are loaded as zeros, which reach no other row. The row sum runs one
program per row, ``BLOCK_D`` columns at a time in one order, then one fixed tree over the block.

Imported only where batch-invariant mode runs on CUDA (Triton comes with CUDA builds of torch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["MatmulConfig", "matmul_config", "matmul", "row_sum", "row_mean", "HALF_CONFIG", "WIDE_HALF_CONFIG",
           "FLOAT32_CONFIG"]


@dataclass(frozen=True)
class MatmulConfig:
    """One tiling of the matrix product (what ``matmul_config`` picks from the dtype, K and N)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


#: bf16/fp16 with an N that 256 does not divide
HALF_CONFIG = MatmulConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4)
#: bf16/fp16 with N a multiple of 256
WIDE_HALF_CONFIG = MatmulConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3)
#: float32, IEEE products (no TF32), as torch's default float32 matmul
FLOAT32_CONFIG = MatmulConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)


def matmul_config(dtype: torch.dtype, k: int, n: int) -> MatmulConfig:
    """The one tiling of a ``[M, k] x [k, n]`` product in ``dtype``, whatever M."""
    if dtype == torch.float32:
        return FLOAT32_CONFIG
    return WIDE_HALF_CONFIG if n % 256 == 0 else HALF_CONFIG


@triton.jit(do_not_specialize=["M", "num_programs"])
def _matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, num_programs,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``c = a @ b (+ bias) (then gelu_tanh)``: ``a [M, K]``, ``b [K, N]``, ``c [M, N]``, fp32 accumulation."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    ks = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, num_programs):
        # GROUP_M row tiles share their column tiles of b while they are in cache
        first_m = (tile // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (tile % tiles_per_group) % group_rows
        tile_n = (tile % tiles_per_group) // group_rows
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GELU_TANH:  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
            acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@functools.lru_cache(maxsize=None)
def _num_programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_operands(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"the invariant matrix product takes [M, K] x [K, N], got {tuple(a.shape)} x {tuple(b.shape)}")
    dtypes = {a.dtype, b.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"the invariant matrix product takes one dtype of float32, float16 or bfloat16 for its operands, got "
            f"{sorted(str(d) for d in dtypes)}; cast the model and its inputs to one dtype"
        )
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"the bias must be [{b.shape[1]}], got {tuple(bias.shape)}")


def _launch(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> torch.Tensor:
    _check_operands(a, b, bias)
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    config = matmul_config(a.dtype, k, n)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    programs = min(_num_programs(a.device), tiles)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"  # half inputs: the argument is not read
    with torch.cuda.device(a.device):
        _matmul_kernel[(programs,)](
            a, b, bias if bias is not None else a, out, m, n, k, programs,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh, INPUT_PRECISION=precision,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out


class _InvariantMatmul(torch.autograd.Function):
    """``a @ b + bias`` with the invariant kernel; the input gradient runs through it too (each row's
    gradient is its own), the gradients of ``b`` and the bias are sums over all rows (torch's)."""

    @staticmethod
    def forward(ctx, a, b, bias):
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        return _launch(a, b, bias, gelu_tanh=False)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _launch(grad.contiguous(), b.t(), None, gelu_tanh=False) if ctx.needs_input_grad[0] else None
        grad_b = a.t().mm(grad) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_bias


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, gelu_tanh: bool = False) -> torch.Tensor:
    """``a [M, K] @ b [K, N] (+ bias [N])`` → ``[M, N]`` in the operands' dtype, each row's result
    independent of the other rows; ``gelu_tanh`` applies the tanh GELU in the epilogue (forward
    only: it has no gradient, as ``torch._addmm_activation``)."""
    a = a.contiguous()
    if gelu_tanh:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, bias)):
            raise ValueError("the fused GELU product has no gradient; compute the product and the GELU apart")
        return _launch(a, b, bias, gelu_tanh=True)
    return _InvariantMatmul.apply(a, b, bias)


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, D, stride_row, BLOCK_D: tl.constexpr):
    """``out[row] = sum(x[row, :D])`` in fp32."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        acc += tl.load(x_ptr + row * stride_row + start + columns, mask=start + columns < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x [M, D]`` → float32 ``[M]``: each row's sum, independent of the other rows (forward only)."""
    if x.dim() != 2:
        raise ValueError(f"the invariant row sum takes [M, D], got {tuple(x.shape)}")
    x = x.contiguous()
    rows, width = x.shape
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return out
    if width == 0:
        return out.zero_()
    with torch.cuda.device(x.device):
        _row_sum_kernel[(rows,)](x, out, width, x.stride(0), BLOCK_D=min(triton.next_power_of_2(width), 4096),
                                 num_warps=4)
    return out


class _InvariantRowMean(torch.autograd.Function):
    """The mean of each row (``row_sum / D``); its gradient, ``grad / D`` spread over the row, is per row."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return (row_sum(x) / x.shape[1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, width = ctx.shape
        return (grad[:, None] / width).expand(rows, width).to(ctx.dtype)


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """``x [M, D]`` → ``[M]`` in ``x``'s dtype: each row's mean (accumulated in fp32), independent of
    the other rows; differentiable."""
    return _InvariantRowMean.apply(x)
