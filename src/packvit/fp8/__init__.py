"""FP8 inference: the encoder blocks' matrix products in e4m3, chosen at load.

``packvit.from_pretrained(ckpt, dtype="fp8")`` (or ``Model(config, dtype="fp8")``) loads the
checkpoint in its own precision, quantises every block's ``attn.qkv``, ``attn.proj`` and MLP
projections to e4m3 (one float32 scale per output channel, from the checkpoint's values) and
casts everything else to bf16: the patch embedding, the norms, attention, position tables and
the pooling heads compute in bf16 exactly as in the bf16 model. At every call each product
quantises its input per token row (``packvit.fp8.quantize``: a dynamic scale per row, with a
stated rule for rows of zeros, infinities and NaN) and multiplies through ``torch._scaled_mm``.

The model then reports ``model.quantization == "fp8"``; ``model.dtype`` and
``model.activation_dtype`` are bf16 (the dtype of its remaining parameters, of its activations
and of the pack metadata it expects). An fp8 model is frozen and computes without gradients, is
refused on a GPU without FP8 (compute capability below 8.9), and is not saved: quantising at
load takes seconds, so the bf16 or float32 checkpoint stays the one kept. On the CPU it runs
(PyTorch's CPU ``_scaled_mm``), slowly: for tests and checks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import GatedMlp, Mlp
from .layers import FAST_ACCUMULATION, INFERENCE_ONLY, Fp8GatedMlp, Fp8Linear, Fp8Mlp
from .quantize import (E4M3, E4M3_MAX, MIN_AMAX, check_fp8_device, fp8_shape_problem, quantize_rows,
                       quantize_weight)

__all__ = [
    "FP8",
    "FP8_DTYPE",
    "quantize_model",
    "check_apply",
    "check_fp8_device",
    "Fp8Linear",
    "Fp8Mlp",
    "Fp8GatedMlp",
    "quantize_rows",
    "quantize_weight",
    "E4M3",
    "E4M3_MAX",
    "MIN_AMAX",
    "FAST_ACCUMULATION",
    "INFERENCE_ONLY",
]

#: the ``dtype`` argument that loads a model in the fp8 mode, and the value of ``model.quantization``
FP8 = "fp8"
#: the dtype of an fp8 model's activations and of everything that is not quantised
FP8_DTYPE = torch.bfloat16


def _fp8_mlp(mlp: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An MLP's e4m3 version, built from its float tensors."""
    if isinstance(mlp, Mlp):
        return Fp8Mlp(Fp8Linear(mlp.fc1.weight, mlp.fc1.bias, dtype),
                      Fp8Linear(mlp.fc2.weight, mlp.fc2.bias, dtype, act=mlp.activation_name))
    if isinstance(mlp, GatedMlp):
        return Fp8GatedMlp(Fp8Linear(mlp.gate_up.weight, mlp.gate_up.bias, dtype),
                           Fp8Linear(mlp.down.weight, mlp.down.bias, dtype, act=mlp.activation_name, gated=True))
    raise ValueError(f"the fp8 mode quantises Mlp and GatedMlp blocks, not {type(mlp).__name__}")


def quantize_model(model: nn.Module) -> None:
    """Puts a packed model (``model.blocks`` of ``EncoderBlock``s) in the fp8 mode, in place.

    The block projections become e4m3 from the tensors' current precision; every other parameter
    and buffer is cast to bf16; all parameters are frozen; ``model.quantization`` becomes ``"fp8"``.
    ``ValueError`` before anything changes where the device has no FP8 or a projection's sizes are
    not multiples of 16.
    """
    check_fp8_device(model.device)
    problems = [f"blocks.{name} ({problem})" for name, layer in model.blocks.named_modules()
                if isinstance(layer, nn.Linear) and (problem := fp8_shape_problem(layer.in_features, layer.out_features))]
    if problems:
        raise ValueError(f"the fp8 mode cannot quantise {', '.join(problems[:4])}; load this model in bf16")
    replacements = []
    with torch.no_grad():
        for block in model.blocks:  # all built from the float tensors first: a refusal changes nothing
            attention = block.attn
            qkv = Fp8Linear(attention.qkv.weight, attention.qkv_bias(), FP8_DTYPE)  # absent bias parts as zeros
            proj = Fp8Linear(attention.proj.weight, attention.proj.bias, FP8_DTYPE)
            replacements.append((block, qkv, proj, _fp8_mlp(block.mlp, FP8_DTYPE)))
        for block, qkv, proj, mlp in replacements:
            block.attn.qkv, block.attn.proj, block.mlp = qkv, proj, mlp
    for module in model.modules():  # the rest in bf16: each module's own tensors, the fp8 layers' left as they are
        if not isinstance(module, Fp8Linear):
            module._apply(lambda t: t.to(FP8_DTYPE) if t.is_floating_point() else t, recurse=False)
    model.requires_grad_(False)
    model.quantization = FP8


def check_apply(model: nn.Module, fn) -> None:
    """``ValueError`` where ``model._apply(fn)`` (``model.to``, ``.cuda()``, ``.half()`` ...) would
    cast one of its fp8 layers or bring it to a device without FP8: checked before anything moves."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.check_apply(fn)
