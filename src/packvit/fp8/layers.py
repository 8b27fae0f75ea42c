"""The e4m3 layers of the FP8 mode: a linear layer and the two MLPs built on it.

``Fp8Linear`` keeps its weight in e4m3 with one float32 scale per output channel, quantises its
input per row at every call and multiplies through ``torch._scaled_mm`` with the row scales in
the epilogue: ``out [M, N] = (q_x · q_wᵀ) * s_x * s_w + bias``, accumulated in float32, bias and
output in the model's dtype (bf16). The MLPs fuse their hidden activation into the second
product's input quantisation, so the activation is read once and never written in bf16.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..layers import compiler_runs_on_cuda
from .quantize import ACTIVATION_CODES, check_fp8_device, fp8_shape_problem, quantize_rows, quantize_weight

__all__ = ["FAST_ACCUMULATION", "Fp8Linear", "Fp8Mlp", "Fp8GatedMlp"]

#: ``_scaled_mm``'s fast accumulation on Hopper (no periodic promotion of the tensor-core partial
#: sums): H200, 32768 rows, 1152 → 4304 features: 1204 TFLOP/s against 1015 without (bf16: 749)
FAST_ACCUMULATION = True

INFERENCE_ONLY = (
    "an fp8 model computes without gradients (e4m3 products have no backward here): run it under "
    "torch.inference_mode() with its parameters frozen as loaded, or train the bf16 model"
)


class Fp8Linear(nn.Module):
    """``x [..., K]`` → ``[..., N]``: ``x Wᵀ + b`` with ``W`` in e4m3 and ``x`` quantised per row.

    Built from a float ``weight [N, K]`` (quantised from its own precision) and ``bias [N]`` or
    ``None``; ``dtype`` is the bias and output dtype. ``act``: the activation applied to the
    input before it is quantised (an MLP's hidden activation, by its ``ACTIVATIONS`` name);
    ``gated``: the input is ``[..., 2K]`` and the product reads ``act(first half) * second half``.

    Buffers (no parameters): ``weight [N, K]`` e4m3, ``weight_scale [1, N]`` float32, ``bias``.
    Moving the layer works as for any module; a dtype cast is refused (it would change the
    format), as is a GPU without FP8.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *,
                 act: str | None = None, gated: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        problem = fp8_shape_problem(in_features, out_features)
        if problem:
            raise ValueError(f"a linear layer of {problem} cannot be quantised")
        if act not in ACTIVATION_CODES:
            raise ValueError(f"the fp8 input quantisation knows the activations {sorted(map(str, ACTIVATION_CODES))}, got {act!r}")
        q, scale = quantize_weight(weight)
        self.register_buffer("weight", q)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale)  # [1, N] float32
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))  # [N]
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, dtype
        self.act, self.gated = act, gated
        self._block = 1 << (in_features - 1).bit_length()  # the kernel's row block: K rounded up to 2^n

    def extra_repr(self) -> str:
        extras = (f", act={self.act}" if self.act else "") + (", gated" if self.gated else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3{extras}"

    def quantize_input(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows [M, K]`` (gated ``[M, 2K]``) → ``(q [M, K] e4m3, scale [M, 1] float32)``: the
        Triton kernel on CUDA, ``quantize_rows`` elsewhere."""
        # inside a compiled layer on CUDA the compiler's Triton is there; asking is for eager calls
        if rows.is_cuda and (torch.compiler.is_compiling() or compiler_runs_on_cuda()):
            from .kernels import quantize_rows_cuda

            return quantize_rows_cuda(rows.contiguous(), self.in_features, self._block, ACTIVATION_CODES[self.act],
                                      self.gated)
        return quantize_rows(rows, self.act, self.gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(INFERENCE_ONLY)
        q, scale = self.quantize_input(x.reshape(-1, x.shape[-1]))  # [M, K] e4m3, [M, 1]
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=self.out_dtype, use_fast_accum=FAST_ACCUMULATION)  # [M, N]
        return out.view(*x.shape[:-1], self.out_features)

    def check_apply(self, fn) -> None:
        """``ValueError`` where ``fn`` (what ``module.to``, ``.cuda()``, ``.half()``... apply to each
        tensor) would cast a buffer or bring the layer to a device without FP8."""
        for tensor in [t for t in (self.weight, self.weight_scale, self.bias) if t is not None]:
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            if probe.dtype != tensor.dtype:
                raise ValueError(
                    f"an fp8 model keeps its formats (e4m3 weights, float32 scales, {self.out_dtype} activations) and "
                    f"cannot be cast to {probe.dtype}; move it with model.to(device), or load the checkpoint again "
                    f"with the dtype wanted"
                )
            check_fp8_device(probe.device)

    def _apply(self, fn, recurse=True):
        self.check_apply(fn)
        return super()._apply(fn, recurse)


class Fp8Mlp(nn.Module):
    """``packvit.layers.Mlp`` in e4m3: ``fc2(act(fc1(x)))``, the activation applied inside fc2's
    input quantisation. Names as ``Mlp``'s (``fc1``, ``fc2``)."""

    #: a gated MLP (three matrices of the MLP width, not two)
    gated: ClassVar[bool] = False

    def __init__(self, fc1: Fp8Linear, fc2: Fp8Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))  # [S, D] → [S, hidden] → [S, D]


class Fp8GatedMlp(nn.Module):
    """``packvit.layers.GatedMlp`` in e4m3: ``down(act(gate) * up)`` with ``gate, up`` the halves
    of ``gate_up(x)``, the gating applied inside down's input quantisation. Names as ``GatedMlp``'s."""

    #: a gated MLP (three matrices of the MLP width, not two)
    gated: ClassVar[bool] = True

    def __init__(self, gate_up: Fp8Linear, down: Fp8Linear):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up(x))  # [S, D] → [S, 2 * hidden] → [S, D]
