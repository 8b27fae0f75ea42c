"""Layers shared by the packed models: the pre-norm encoder block, varlen self-attention, MLPs,
RMSNorm, LayerScale and the attention-pooling heads.

Every layer works on packed tokens ``[total_tokens, hidden]`` and takes a ``VarlenContext``, the
per-forward attention metadata built once on the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import varlen_attention
from .packing import SegmentLayout
from .positions import RotaryTable

__all__ = [
    "VarlenContext",
    "run_layer",
    "layers_compiled",
    "compiler_runs_on_cuda",
    "FusedQKVSelfAttention",
    "Mlp",
    "GatedMlp",
    "RMSNorm",
    "LayerScale",
    "EncoderBlock",
    "AttentionPoolingHead",
    "ProbePoolingHead",
    "ACTIVATIONS",
    "activation",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def _call_layer(layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    return layer(x, *args)


_compiled_call_layer = None


@functools.lru_cache(maxsize=None)
def compiler_runs_on_cuda() -> bool:
    """Whether torch.compile can generate CUDA kernels here (it needs Triton)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def layers_compiled(setting: bool | None, layer: nn.Module, x: torch.Tensor) -> bool:
    """Resolves a model's ``compile_layers`` for one forward.

    ``True``/``False`` are obeyed. ``None`` (the default, "auto") compiles where it is measured to
    pay and cannot cost a recompilation per batch: on CUDA, with autograd off, where Triton is
    available, for layer classes that do not opt out with ``compile_by_default = False``.
    """
    if setting is not None:
        return setting
    return (
        x.device.type == "cuda"
        and not torch.is_grad_enabled()
        and getattr(layer, "compile_by_default", True)
        and compiler_runs_on_cuda()
    )


def run_layer(layer: nn.Module, x: torch.Tensor, *args, compiled: bool | None = None) -> torch.Tensor:
    """``layer(x, *args)``, or the same through ``torch.compile`` with a dynamic token count.

    ``compiled`` is a model's ``compile_layers`` setting (see ``layers_compiled``). The compiled
    path fuses the norms, activations, residual adds and RoPE around the matrix products into a
    few kernels. One compilation serves every layer of every model with the same layer code, and
    packs of any composition reuse it (the token count is symbolic and the segment structure only
    reaches the eager attention call).
    """
    global _compiled_call_layer
    if not layers_compiled(compiled, layer, x):
        return layer(x, *args)
    if _compiled_call_layer is None:
        _compiled_call_layer = torch.compile(_call_layer, dynamic=True)
    return _compiled_call_layer(layer, x, *args)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; packvit knows {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class VarlenContext:
    """Attention metadata of one forward: segments (host), their device offsets, the backend.

    ``cu_seqlens`` is int32 on the model's device, ``max_seqlen`` a Python int; ``pool_cu_seqlens``
    is ``[0, 1, ..., num_segments]``, the query offsets of a one-query-per-segment pooling head.
    """

    segments: SegmentLayout
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pool_cu_seqlens: torch.Tensor
    backend: str | None = None

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device, backend: str | None = None) -> "VarlenContext":
        segments = SegmentLayout.from_lengths(lengths)
        pool = SegmentLayout.one_per_item(segments.num_segments)
        return cls(segments, segments.cu_seqlens(device), segments.max_seqlen, pool.cu_seqlens(device), backend)

    # Attention runs eagerly even inside a compiled layer: the kernels are opaque to the compiler,
    # and the graph break keeps each compiled piece free of the batch's segment structure.
    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Self-attention within segments: ``[S, H, hd]`` each → ``[S, H, hd]``."""
        uniform = self.max_seqlen if self.max_seqlen * self.segments.num_segments == self.segments.total else None
        return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                scale=scale, backend=self.backend, uniform_seqlen=uniform)

    @torch.compiler.disable
    def pool(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """One query per segment: ``query [N, H, hd]``, ``k, v [S, H, hd]`` → ``[N, H, hd]``."""
        return varlen_attention(query, k, v, self.pool_cu_seqlens, self.cu_seqlens, 1, self.max_seqlen,
                                scale=scale, backend=self.backend)


class FusedQKVSelfAttention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection (rows q, k, v) and an output ``proj``.

    ``qkv_bias``: whether the projection has a bias, or a (q, k, v) triple of flags for a fused
    bias of which only some parts exist (``bias_parts``). The absent parts are stored as zeros
    (the checkpoint layout of one ``[3 * dim]`` bias) and used as zeros without gradient: with a
    rotary table after the projection a key bias is not softmax-invariant, so an absent part that
    took gradient would be trained into a parameter the architecture does not have.
    ``rotary``, if given, rotates queries and keys ``[S, H, hd]`` after projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | tuple[bool, bool, bool] = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        parts = (qkv_bias,) * 3 if isinstance(qkv_bias, bool) else tuple(bool(flag) for flag in qkv_bias)
        if len(parts) != 3:
            raise ValueError(f"qkv_bias is a bool or three flags (q, k, v), got {qkv_bias!r}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=any(parts))
        #: which of the q, k, v parts of the fused bias exist (absent parts: zeros without gradient)
        self.bias_parts: tuple[bool, bool, bool] = parts if any(parts) else (True, True, True)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def qkv_bias(self) -> torch.Tensor | None:
        """The fused bias ``[3 * D]`` as the projection adds it: the absent parts as zeros."""
        bias = self.qkv.bias
        if bias is None or all(self.bias_parts):
            return bias
        parts = bias.view(3, -1).unbind(0)  # [3 * D] → three [D]
        return torch.cat([part if kept else torch.zeros_like(part) for part, kept in zip(parts, self.bias_parts)])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S, D]`` → ``[S, 3 * D]`` (rows q, k, v), the absent bias parts as zeros."""
        # a quantised projection (packvit.fp8) is built with qkv_bias() and is called as it is
        if self.qkv.bias is None or all(self.bias_parts) or not isinstance(self.qkv, nn.Linear):
            return self.qkv(x)
        return F.linear(x, self.qkv.weight, self.qkv_bias())

    def forward(self, x: torch.Tensor, context: VarlenContext, rotary: RotaryTable | None = None) -> torch.Tensor:
        total = x.shape[0]
        # [S, D] → [S, 3, H, hd] → three [S, H, hd]
        q, k, v = self.project(x).view(total, 3, self.num_heads, self.head_dim).unbind(1)
        if rotary is not None:
            q, k = rotary.apply(q, k)
        out = context.attend(q, k, v)
        return self.proj(out.reshape(total, -1))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``.

    With the tanh GELU on CUDA, ``fc1`` and the activation are one cuBLASLt matrix product with a
    GELU epilogue (``torch._addmm_activation``, whose CUDA kernels compute the tanh approximation):
    the ``[S, hidden]`` activation is written once instead of written, read and written again. On
    the CPU that function computes the exact GELU, so the CPU keeps the unfused path; so does a
    compiled layer, where the compiler fuses the bias and GELU itself, and so does a forward that
    records a graph for backward (the fused function has no derivative).
    """

    #: a gated MLP (three matrices of the MLP width, not two)
    gated: ClassVar[bool] = False

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.activation_name = act
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.gelu_tanh = act in ("gelu_pytorch_tanh", "gelu_tanh")

    def _gelu_epilogue(self, x: torch.Tensor) -> bool:
        # torch._addmm_activation has no derivative: the fused path serves forwards without autograd
        records_graph = torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad)
        return (self.gelu_tanh and x.is_cuda and x.dim() == 2 and self.fc1.bias is not None
                and not records_graph and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gelu_epilogue(x):
            hidden = torch._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True)
        else:
            hidden = self.act(self.fc1(x))
        return self.fc2(hidden)


class GatedMlp(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))`` with gate and up fused in one ``gate_up`` projection."""

    #: a gated MLP (three matrices of the MLP width, not two)
    gated: ClassVar[bool] = True

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.activation_name = act
        self.act = activation(act)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` computed in float32 and cast back before the weight (as in HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LayerScale(nn.Module):
    """Per-channel scale ``x * lambda1``."""

    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class EncoderBlock(nn.Module):
    """The pre-norm block of every family: ``x + ls1(attn(norm1 x))``, then ``x + ls2(mlp(norm2 x))``.

    ``norm`` builds a norm layer (LayerNorm or RMSNorm); ``mlp`` is the block's MLP; ``qkv_bias``
    as ``FusedQKVSelfAttention`` takes it; ``layer_scale`` adds LayerScale on both branches
    (identity otherwise). ``compile_by_default``: whether the automatic ``compile_layers`` setting
    compiles this block (see ``layers_compiled``).
    """

    def __init__(self, dim: int, num_heads: int, norm: Callable[[], nn.Module], mlp: nn.Module, *,
                 qkv_bias: bool | tuple[bool, bool, bool] = True, proj_bias: bool = True, layer_scale: bool = False,
                 compile_by_default: bool = True):
        super().__init__()
        self.norm1 = norm()
        self.attn = FusedQKVSelfAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = norm()
        self.mlp = mlp
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()
        self.compile_by_default = compile_by_default

    def forward(self, x: torch.Tensor, context: VarlenContext, rotary: RotaryTable | None = None) -> torch.Tensor:
        """``x [S, D]`` → ``[S, D]``."""
        x = x + self.ls1(self.attn(self.norm1(x), context, rotary))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolingHead(nn.Module):
    """Multihead attention pooling (MAP): a learned probe attends over each segment.

    ``pooled = y + mlp(norm(y))`` with ``y = out_proj(attention(W_q probe, W_k x, W_v x))`` per
    segment, one varlen call for all segments. Parameter names follow ``nn.MultiheadAttention``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str, norm: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.Module()
        self.attention.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.attention.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.attention.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.normal_(self.probe, std=0.02)
        self.norm = norm
        self.mlp = Mlp(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, context: VarlenContext) -> torch.Tensor:
        """``x [S, D]`` → ``[num_segments, D]``."""
        num_segments, dim = context.segments.num_segments, x.shape[-1]
        w_q, w_kv = self.attention.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = self.attention.in_proj_bias.split([dim, 2 * dim])
        query = F.linear(self.probe.reshape(1, dim), w_q, b_q)
        query = query.expand(num_segments, dim).reshape(num_segments, self.num_heads, self.head_dim)
        # [S, D] → [S, 2, H, hd] → k, v [S, H, hd]
        k, v = F.linear(x, w_kv, b_kv).view(x.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        pooled = self.attention.out_proj(context.pool(query.contiguous(), k, v).reshape(num_segments, dim))
        return pooled + self.mlp(self.norm(pooled))


class ProbePoolingHead(nn.Module):
    """One learned query per segment, split into heads without projection, attends over the
    segment's tokens (keys ``k_proj x``, values ``v_proj x``, default scale); ``output_proj`` maps
    the result. No norm, MLP or residual (AIMv2's head)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.output_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: VarlenContext) -> torch.Tensor:
        """``x [S, D]`` → ``[num_segments, D]``."""
        total, dim = x.shape
        num_segments = context.segments.num_segments
        key = self.k_proj(x).view(total, self.num_heads, self.head_dim)  # [S, H, hd]
        value = self.v_proj(x).view(total, self.num_heads, self.head_dim)  # [S, H, hd]
        # [1, 1, D] → [N, H, hd], in the keys' dtype (under autocast it is not the parameter's)
        query = self.cls_token.reshape(1, self.num_heads, self.head_dim).to(key.dtype)
        query = query.expand(num_segments, -1, -1).contiguous()
        pooled = context.pool(query, key, value)  # [N, H, hd]
        return self.output_proj(pooled.reshape(num_segments, dim))
