"""The number format of packvit's FP8 mode: e4m3 values with one float32 scale per row.

A row ``x [K]`` is stored as ``q = e4m3(clamp(x / s, -448, 448))`` with
``s = clamp(max|x|, MIN_AMAX, FLOAT32_MAX) / 448``, so that ``x ≈ q * s`` with the largest entry
exactly ``±448 * s``. Activations are quantised this way per token row at every call, weights
once per output channel. Rows that are not ordinary follow one rule:

- a row of zeros (or of magnitudes all below ``MIN_AMAX``) gets ``s = MIN_AMAX / 448`` and
  quantises to zeros: its product is the bias exactly;
- a row holding a NaN gets ``s = NaN``: its product is NaN in every column, as the bf16 product's
  is, and no other row is touched;
- a row holding ±inf and no NaN gets the largest float32 scale: its infinite entries become
  ``±448 * s`` (``±FLOAT32_MAX``), its finite ones round towards zero; its product is finite or
  ±inf, never NaN. An activation applied first (``act``) maps -inf to NaN (``-inf * 0`` in gelu and
  silu, as the bf16 model's own activation does), and that row then follows the NaN rule.

``quantize_rows`` is the definition in PyTorch operations (the CPU path, and what the CUDA
kernel of ``packvit.fp8.kernels`` is tested against).
"""

from __future__ import annotations

import torch

from ..layers import activation

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "MIN_AMAX",
    "FLOAT32_MAX",
    "ACTIVATION_CODES",
    "row_scales",
    "quantize_rows",
    "quantize_weight",
    "fp8_shape_problem",
    "check_fp8_device",
]

E4M3 = torch.float8_e4m3fn
#: the largest finite e4m3 value
E4M3_MAX = float(torch.finfo(E4M3).max)
#: the smallest row maximum a scale is made for (rows of zeros quantise against it)
MIN_AMAX = 1e-12
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: the activations a linear's input quantisation applies first (an MLP's hidden activation), by
#: name as ``packvit.layers.ACTIVATIONS`` spells them, and their codes in the CUDA kernel
ACTIVATION_CODES: dict[str | None, int] = {
    None: 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_tanh": 2, "quick_gelu": 3, "silu": 4,
}


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """Row maxima ``[M, 1]`` → float32 scales ``[M, 1]`` (NaN stays NaN)."""
    return amax.float().clamp(min=MIN_AMAX, max=FLOAT32_MAX) / E4M3_MAX


def quantize_rows(x: torch.Tensor, act: str | None = None, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → ``(q [M, K] e4m3, scale [M, 1] float32)`` with ``x ≈ q * scale``, by rows.

    ``act``: an activation applied (in float32) before quantising; ``gated``: ``x`` is ``[M, 2K]``
    and the rows quantised are ``act(x[:, :K]) * x[:, K:]`` (SwiGLU's gate and up halves).
    """
    values = x.float()
    if gated:
        gate, up = values.chunk(2, dim=-1)
        values = activation(act)(gate) * up if act is not None else gate * up
    elif act is not None:
        values = activation(act)(values)
    scale = row_scales(values.abs().amax(dim=-1, keepdim=True))
    return (values / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight ``[N, K]`` → ``(q [N, K] e4m3, scale [1, N] float32)``: one scale per
    output channel, computed from the weight's own precision."""
    q, scale = quantize_rows(weight.detach())
    return q, scale.reshape(1, -1)


def fp8_shape_problem(in_features: int, out_features: int) -> str | None:
    """Why a linear layer of these sizes cannot run as an e4m3 product, or ``None``: the GPU
    kernels need both sizes to be multiples of 16 (16-byte aligned rows)."""
    if in_features % 16 or out_features % 16:
        return f"{in_features} → {out_features} features (e4m3 products need multiples of 16)"
    return None


def check_fp8_device(device: torch.device) -> None:
    """``ValueError`` unless e4m3 products run on ``device``: an NVIDIA GPU of compute capability
    8.9 or newer (Ada, Hopper, Blackwell), or the CPU (PyTorch's CPU ``_scaled_mm``: exact to the
    format, slow, for tests and checks)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(
            f"packvit's fp8 mode runs on NVIDIA GPUs of compute capability 8.9 or newer and on the CPU, not on "
            f"{device.type}; load the model on 'cuda' or 'cpu'"
        )
    if torch.version.hip is not None:
        raise ValueError("packvit's fp8 mode uses NVIDIA's e4m3 format (float8_e4m3fn); on ROCm load the model in bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(
            f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no FP8 "
            f"matrix units: fp8 needs compute capability 8.9 or newer (L4/L40/RTX 40xx, H100/H200, B200); load the "
            f"model in bf16 instead (dtype=torch.bfloat16, the default on CUDA)"
        )
