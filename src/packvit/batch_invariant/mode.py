"""The switch of batch-invariant mode: where it is read, the attention backends it runs, and the
function mode that routes a forward's row-dependent operations to ``ops``.

``invariant_kernels()`` is a ``torch.overrides.TorchFunctionMode`` for the duration of a forward:
``F.linear``, ``torch._addmm_activation`` (the fused GELU product), ``@``/``matmul``/``mm``/``addmm``
of 2-D operands, and on CUDA ``mean`` over the last dimension, go to ``ops``; on the CPU so do the
activations. A function that could make a row depend on other rows and has no invariant version
here (``bmm``, ``einsum``, FP8's ``_scaled_mm``; on CUDA sums, softmax, norms) raises instead of
running, so that a forward either is batch-invariant or fails. Everything else runs as it is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import attention
from . import ops

__all__ = ["ENV_VAR", "INVARIANT_ATTENTION_BACKENDS", "NOT_INVARIANT_ATTENTION_BACKENDS", "from_environment",
           "attention_backend", "invariant_kernels", "with_invariant_kernels", "check_model", "runs_batch_invariant"]

ENV_VAR = "PACKVIT_BATCH_INVARIANT"

#: attention backends whose output for a segment does not depend on the other segments of the call,
#: in the order batch-invariant mode prefers them, with why
INVARIANT_ATTENTION_BACKENDS: dict[str, str] = {
    "fa2": "FlashAttention 2's varlen forward runs one thread block per (segment, head, query block) over the "
           "segment's keys in order; it splits the keys only for one-query decoding with grouped heads, which "
           "packvit never calls",
    "aten_flash": "PyTorch's bundled FlashAttention 2: the same varlen forward",
    "efficient": "one thread block per (segment, head, query block) over the segment's keys in order, no split "
                 "(float32 on CUDA)",
    "reference": "one dense attention call per segment (CPU; on CUDA it reads the offsets back, a host sync)",
}
#: the backends that do not serve batch-invariant mode, and why
NOT_INVARIANT_ATTENTION_BACKENDS: dict[str, str] = {
    "fa4": "its kernel variant is chosen from the pack (a persistent kernel when the longest segment fits one "
           "tile, another past 256 segments), so an item's segment may run another kernel in another pack",
    "fa3": "it splits a segment's keys between thread blocks by a heuristic over the pack's sizes",
    "torch_varlen": "torch.nn.attention.varlen may route to cuDNN, whose plan depends on the pack's shape",
    "dense_sdpa": "it serves packs of equal-length segments only, so an item would switch kernels with its pack-mates",
}


def from_environment() -> bool:
    """``PACKVIT_BATCH_INVARIANT`` as a switch: 1/true/yes/on or 0/false/no/off (unset: off)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a switch: set it to 1 (on) or 0 (off), or unset it")


def attention_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int, requested: str | None = None) -> str:
    """The attention backend of batch-invariant mode on (device, dtype, head_dim).

    ``requested`` (a model's ``attention_backend``, else ``PACKVIT_ATTENTION``) must be one of
    ``INVARIANT_ATTENTION_BACKENDS``; without one, the first of them that runs here.
    """
    name = requested or os.environ.get(attention.ENV_VAR) or None
    if name in (None, "auto"):
        return _first_invariant_backend(torch.device(device), dtype, int(head_dim))
    if name not in INVARIANT_ATTENTION_BACKENDS:
        reason = NOT_INVARIANT_ATTENTION_BACKENDS.get(name, "packvit has no attention backend of that name")
        source = "attention_backend" if requested else attention.ENV_VAR
        raise ValueError(
            f"{source}={name!r} cannot serve batch-invariant mode: {reason}; leave it unset (automatic) or choose one "
            f"of {list(INVARIANT_ATTENTION_BACKENDS)}"
        )
    return attention.select_backend(device, dtype, head_dim, name)


@functools.lru_cache(maxsize=None)
def _first_invariant_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    for candidate in INVARIANT_ATTENTION_BACKENDS:
        try:
            return attention.select_backend(device, dtype, head_dim, candidate)
        except ValueError:
            continue
    raise AssertionError("the reference backend runs everywhere")


def check_model(model) -> None:
    """Refuses the settings batch-invariant mode cannot serve (before a forward runs)."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(
            f"batch-invariant mode runs its own matrix products and this model computes its projections in "
            f"{model.quantization}; load it without dtype={model.quantization!r}, or turn batch_invariant off"
        )
    if model.compile_layers is True:
        raise ValueError(
            "batch-invariant mode runs the encoder blocks eagerly (compiled kernels choose their reductions from the "
            "pack's size) and compile_layers is True; set compile_layers to None (automatic) or False"
        )
    device = model.device
    if device.type == "cuda":
        ops.require_kernels()
    elif device.type != "cpu":
        raise ValueError(f"batch-invariant mode runs on the CPU and on CUDA GPUs, and the model is on {device}")


def _uncovered(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            f"{name} was called in a batch-invariant forward, and packvit has no batch-invariant version of it: its "
            f"result for one item could depend on the others; turn batch_invariant off for this model"
        )
    return refuse


def _on_cpu(cpu_version, function):
    """``cpu_version`` for CPU tensors, ``function`` (torch's) elsewhere."""
    def dispatch(x, *args, **kwargs):
        return cpu_version(x, *args, **kwargs) if x.device.type == "cpu" else function(x, *args, **kwargs)
    return dispatch


def _on_cuda(cuda_version, function):
    """``cuda_version`` for CUDA tensors, ``function`` (torch's) elsewhere."""
    def dispatch(x, *args, **kwargs):
        return cuda_version(x, *args, **kwargs) if x.device.type == "cuda" else function(x, *args, **kwargs)
    return dispatch


def _linear(input, weight, bias=None):
    return ops.linear(input, weight, bias)


def _matmul(input, other, *, out=None):
    if out is not None or input.dim() < 2 or other.dim() != 2:
        _uncovered(f"matmul of {tuple(input.shape)} and {tuple(other.shape)}")()
    return ops.matmul(input, other)


def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    if out is not None or beta != 1 or alpha != 1 or mat1.dim() != 2 or input.shape not in ((mat2.shape[1],), (1, mat2.shape[1])):
        _uncovered("addmm with a scale, an out= tensor or a bias that is not one row")()
    return ops.matmul(mat1, mat2, input.reshape(-1))


def _addmm_activation(input, mat1, mat2, *, beta=1, alpha=1, use_gelu=False):
    # torch's CUDA kernels compute the tanh GELU here, its CPU kernel the exact one
    if beta != 1 or alpha != 1 or input.shape != (mat2.shape[1],):
        _uncovered("torch._addmm_activation with a scale or a bias that is not one row")()
    if not use_gelu:
        return torch.relu(ops.matmul(mat1, mat2, input))
    if mat1.device.type == "cuda":
        return ops.matmul(mat1, mat2, input, gelu_tanh=True)
    return ops.gelu(ops.matmul(mat1, mat2, input))


def _cuda_mean(input, dim=None, keepdim=False, *, dtype=None, out=None):
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else None
    if out is not None or dims is None or len(dims) != 1 or dims[0] % max(input.dim(), 1) != input.dim() - 1:
        _uncovered(f"mean over {dim!r} (the last dimension alone has an invariant version)")()
    return ops.row_mean(input if dtype is None else input.to(dtype), keepdim)


def _cpu_mean(input, dim=None, keepdim=False, *, dtype=None, out=None):
    if input.dim():
        ops.check_cpu_row(input.shape[-1])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if out is not None:
        kwargs["out"] = out
    return torch.mean(input, **kwargs) if dim is None else torch.mean(input, dim, keepdim, **kwargs)


def _silu(input, inplace=False):
    return ops.silu(input)


def _refused_on_cuda(name: str, function):
    """Refused for CUDA tensors (whose reductions split by shape), ``function`` (torch's) elsewhere."""
    return _on_cuda(_uncovered(f"{name} on CUDA"), function)


_HANDLERS = {
    F.linear: _linear,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.addmm: _addmm, torch.Tensor.addmm: _addmm,
    torch._addmm_activation: _addmm_activation,
    torch.mean: _on_cuda(_cuda_mean, _cpu_mean), torch.Tensor.mean: _on_cuda(_cuda_mean, _cpu_mean),
    F.gelu: _on_cpu(ops.gelu, F.gelu),
    F.silu: _on_cpu(_silu, F.silu),
    torch.sigmoid: _on_cpu(ops.sigmoid, torch.sigmoid), torch.Tensor.sigmoid: _on_cpu(ops.sigmoid, torch.Tensor.sigmoid),
    **{function: _uncovered(name) for name, function in [
        ("torch.bmm", torch.bmm), ("Tensor.bmm", torch.Tensor.bmm), ("torch.baddbmm", torch.baddbmm),
        ("torch.einsum", torch.einsum), ("torch.tensordot", torch.tensordot), ("F.bilinear", F.bilinear),
        ("torch._scaled_mm", torch._scaled_mm),
    ]},
    **{function: _refused_on_cuda(name, function) for name, function in [
        ("torch.sum", torch.sum), ("Tensor.sum", torch.Tensor.sum), ("torch.softmax", torch.softmax),
        ("Tensor.softmax", torch.Tensor.softmax), ("F.softmax", F.softmax), ("F.log_softmax", F.log_softmax),
        ("torch.var", torch.var), ("torch.std", torch.std), ("torch.norm", torch.norm), ("Tensor.norm", torch.Tensor.norm),
        ("torch.linalg.vector_norm", torch.linalg.vector_norm), ("F.normalize", F.normalize),
        ("torch.cumsum", torch.cumsum), ("F.rms_norm", F.rms_norm),
    ]},
}


class _InvariantFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        return (handler or func)(*args, **(kwargs or {}))


_state = threading.local()


@contextlib.contextmanager
def invariant_kernels():
    """Routes the row-dependent operations of the code inside to batch-invariant versions (see the
    module documentation); nested uses are one."""
    if getattr(_state, "depth", 0):
        _state.depth += 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    _state.depth = 1
    try:
        with _InvariantFunctions():
            yield
    finally:
        _state.depth = 0


def with_invariant_kernels(function):
    """``function`` run under ``invariant_kernels()`` (a gradient-checkpointed block's recompute included)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with invariant_kernels():
            return function(*args, **kwargs)
    return wrapper


def runs_batch_invariant(method):
    """A model method run under ``invariant_kernels()`` when the model's ``batch_invariant`` is on,
    after ``check_model``."""
    @functools.wraps(method)
    def wrapper(model, *args, **kwargs):
        if not model.batch_invariant:
            return method(model, *args, **kwargs)
        check_model(model)
        with invariant_kernels():
            return method(model, *args, **kwargs)
    return wrapper
