"""AIMv2 vision encoder on packed sequences (transformers' ``Aimv2VisionModel``).

Apple's AIMv2: a pre-RMSNorm ViT with SwiGLU MLPs, no biases, no CLS token, patch size 14.

    x   = RMSNorm(Linear(patches)) + position embedding       # per image, [h*w, D]
    x   = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))   # every layer, varlen
    out = RMSNorm(x)                                           # last_hidden_state, every token
    pooled_i = output_proj(attention of head.cls_token over image i)   # -lit checkpoints only

Position embeddings come in two kinds:

- native checkpoints (``is_native``): a 2-D sin-cos table per image grid. The token at row r,
  column c gets ``[sin(c*w) | cos(c*w) | sin(r*w) | cos(r*w)]`` with ``w_k = 10000^(-k/(D/4))``,
  computed in float64 and cast to the activation dtype, as in the reference.
- fixed-size checkpoints (224/336/448): a learned ``(S*S, D)`` table for one ``S x S`` grid. Any
  other grid raises ``ValueError``. ``forward(..., interpolate_pos_encoding=True)`` instead resizes
  the table bicubically (float32, antialiased when shrinking, as timm's ``resample_abs_pos_embed``).
  That goes beyond the reference, which never resizes.

Input patches are flattened in the (p, p, C) layout of ``packvit.patchify`` (``layout="ppc"``);
the checkpoint's Conv2d patch embedding becomes a Linear at load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import FusedQKVSelfAttention, GatedMlp, RMSNorm, VarlenContext, fuse_linear, run_layer
from ..packing import item_token_counts, offsets_within_items, to_device, validate_grid_thw, validate_patches
from .base import PackedVisionModel, PackedVisionOutput, strip_prefix

__all__ = [
    "AIMv2Config",
    "AIMv2Packing",
    "config_from_hf_dict",
    "sincos_position_embedding",
    "patch_rows_and_columns",
]


# --- Configuration ------------------------------------------------------------------------------


@dataclass
class AIMv2Config:
    """The vision tower's configuration; field names and defaults follow ``Aimv2VisionConfig``."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    use_head: bool = True
    is_native: bool = False

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def learned_grid_side(self) -> int:
        """Side, in patches, of the learned position table (fixed-size checkpoints)."""
        return self.image_size // self.patch_size


AIMV2_MODEL_TYPES = ("aimv2_vision_model", "aimv2")


def config_from_hf_dict(config_dict: dict) -> AIMv2Config:
    """``Aimv2VisionConfig`` or ``Aimv2Config`` (its ``vision_config``) as a dict → ``AIMv2Config``."""
    model_type = config_dict.get("model_type")
    if model_type not in AIMV2_MODEL_TYPES:
        raise ValueError(
            f"checkpoint has model_type {model_type!r}, not an AIMv2 checkpoint (expected one of "
            f"{AIMV2_MODEL_TYPES}); load it with the packvit model of its own family"
        )
    vision = config_dict.get("vision_config") if model_type == "aimv2" else config_dict
    if not vision:
        raise ValueError(
            "AIMv2 checkpoint (model_type 'aimv2') has no vision_config: it is in the original remote-code "
            "format; convert it with transformers' convert_aimv2_original_pytorch_to_hf.py first"
        )
    known = {f.name for f in fields(AIMv2Config)}
    config = AIMv2Config(**{key: value for key, value in vision.items() if key in known})
    for name in ("image_size", "patch_size"):
        value = getattr(config, name)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"AIMv2 needs a square {name}, the checkpoint has {value}")
            setattr(config, name, int(value[0]))
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"AIMv2 uses a SwiGLU MLP with silu, the checkpoint asks for {config.hidden_act!r}")
    config.hidden_act = "silu"
    return config


# --- Embeddings ---------------------------------------------------------------------------------


def sincos_position_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int, dtype: torch.dtype,
                              device: torch.device | str = "cpu") -> torch.Tensor:
    """AIMv2's 2-D sin-cos embedding of tokens at host positions ``rows, cols [n]``: ``[n, dim]``.

    ``[sin(c*w) | cos(c*w) | sin(r*w) | cos(r*w)]`` with ``w_k = 10000^(-k/(dim/4))``, computed in
    float64 on ``device`` from one 1-D table over ``0..max(rows, cols)``, then cast to ``dtype``:
    value for value the reference's per-grid table.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    device = torch.device(device)
    quarter = dim // 4
    side = int(max(rows.max(), cols.max())) + 1
    compute_dtype = torch.float32 if device.type == "mps" else torch.float64
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=compute_dtype, device=device) / quarter)  # [D/4]
    angles = torch.arange(side, dtype=compute_dtype, device=device).outer(omega)  # [side, D/4]
    table = torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)  # [side, D/2]
    halves = table[to_device(torch.from_numpy(np.stack([cols.numpy(), rows.numpy()])), device)]  # [2, n, D/2]: column part, row part
    return torch.cat([halves[0], halves[1]], dim=1)  # [n, D]


def patch_rows_and_columns(grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch of a host image grid ``[N, 3]`` (t = 1): two int64 ``[S]``."""
    counts = grid_thw.prod(dim=1).numpy()  # [N]
    widths = np.repeat(grid_thw[:, 2].numpy(), counts)  # [S]
    offsets = offsets_within_items(counts)  # [S]
    return torch.from_numpy(offsets // widths), torch.from_numpy(offsets % widths)


class AIMv2Embeddings(nn.Module):
    """Patch projection (Linear over (p, p, C) patches), RMSNorm, position embedding."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.is_native:
            self.position_embedding = nn.Embedding(config.learned_grid_side ** 2, config.hidden_size)

    def position_embeddings(self, grid_thw: torch.Tensor, dtype: torch.dtype, interpolate: bool) -> torch.Tensor:
        """Position embedding of every token of the pack: ``[total_patches, D]``.

        ``grid_thw`` is the validated host grid; index tensors are built on the host and copied to
        the device once, without reading anything back.
        """
        device = self.patch_embed.weight.device
        rows, cols = patch_rows_and_columns(grid_thw)
        if self.config.is_native:
            return sincos_position_embedding(rows, cols, self.config.hidden_size, dtype, device)
        return self._learned_position_embeddings(grid_thw, rows, cols, interpolate)

    def _learned_position_embeddings(self, grid_thw, rows, cols, interpolate: bool) -> torch.Tensor:
        side = self.config.learned_grid_side
        weight = self.position_embedding.weight  # [side*side, D]
        grids = sorted({(h, w) for _, h, w in grid_thw.tolist()})
        foreign = [grid for grid in grids if grid != (side, side)]
        if foreign and not interpolate:
            raise ValueError(
                f"this AIMv2 checkpoint has a learned position table for a {side}x{side} patch grid "
                f"({side * self.config.patch_size}px images) but the batch has grids {foreign[:4]}; "
                f"resize images to {side * self.config.patch_size}x{side * self.config.patch_size} (packvit.preprocess.aimv2 "
                f"does), or pass interpolate_pos_encoding=True to resize the table (beyond the reference)"
            )
        # One bank holding the table of every distinct grid; each token indexes its own row.
        banks, offsets, offset = [], {}, 0
        for h, w in grids:
            banks.append(weight if (h, w) == (side, side) else _resize_table(weight, side, h, w))
            offsets[(h, w)] = offset
            offset += h * w
        counts = grid_thw.prod(dim=1).numpy()
        starts = np.array([offsets[(h, w)] for _, h, w in grid_thw.tolist()], dtype=np.int64)
        index = torch.from_numpy(np.repeat(starts, counts) + rows.numpy() * np.repeat(grid_thw[:, 2].numpy(), counts) + cols.numpy())
        bank = banks[0] if len(banks) == 1 else torch.cat(banks)  # [sum of distinct h*w, D]
        return bank[to_device(index, bank.device)]

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor, interpolate: bool) -> torch.Tensor:
        """``patches [S, p*p*C]`` → ``[S, D]``."""
        x = self.rms_norm(self.patch_embed(patches))
        return x + self.position_embeddings(grid_thw, x.dtype, interpolate)


def _resize_table(weight: torch.Tensor, side: int, height: int, width: int) -> torch.Tensor:
    """Learned table ``[side*side, D]`` → ``[height*width, D]``: bicubic, float32, antialiased when shrinking."""
    dim = weight.shape[1]
    # [side*side, D] → [1, D, side, side]
    grid = weight.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False,
                            antialias=height < side or width < side)
    # [1, D, height, width] → [height*width, D]
    return resized.permute(0, 2, 3, 1).reshape(height * width, dim).to(weight.dtype)


# --- Encoder ------------------------------------------------------------------------------------


class AIMv2Layer(nn.Module):
    """Pre-RMSNorm block: ``x + attention(norm1 x)``, then ``x + SwiGLU(norm2 x)``."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.rms_norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = FusedQKVSelfAttention(config.hidden_size, config.num_attention_heads,
                                               qkv_bias=config.qkv_bias, proj_bias=config.qkv_bias)
        self.rms_norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = GatedMlp(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, context: VarlenContext) -> torch.Tensor:
        x = x + self.attention(self.rms_norm1(x), context)
        return x + self.ffn(self.rms_norm2(x))


class AIMv2Encoder(nn.Module):
    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.layers = nn.ModuleList(AIMv2Layer(config) for _ in range(config.num_hidden_layers))


# --- Head ---------------------------------------------------------------------------------------


class AIMv2AttentionPoolingHead(nn.Module):
    """One query per image: the learned ``cls_token``, split into heads without projection,
    attends over the image's tokens (keys ``k_proj x``, values ``v_proj x``, default scale);
    ``output_proj`` (with bias) maps the result. No norm, MLP or residual."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.output_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: VarlenContext) -> torch.Tensor:
        """``x [S, D]`` → ``[num_items, D]``."""
        total, dim = x.shape
        num_items = context.segments.num_segments
        # [1, 1, D] → [num_items, H, hd]
        query = self.cls_token.reshape(1, self.num_heads, self.head_dim).expand(num_items, -1, -1).contiguous()
        key = self.k_proj(x).view(total, self.num_heads, self.head_dim)  # [S, H, hd]
        value = self.v_proj(x).view(total, self.num_heads, self.head_dim)  # [S, H, hd]
        pooled = context.pool(query, key, value)  # [num_items, H, hd]
        return self.output_proj(pooled.reshape(num_items, dim))


# --- Model --------------------------------------------------------------------------------------


class AIMv2Packing(PackedVisionModel):
    """AIMv2 vision tower on packed patches.

    ``AIMv2Packing(config)`` builds random weights from an ``AIMv2Config``;
    ``AIMv2Packing(ckpt=dir_or_hub_id)`` / ``from_pretrained`` loads an ``Aimv2VisionModel``
    checkpoint or the vision tower of an ``Aimv2Model`` one (-lit, with its pooling head).

    ``forward(patches [S, 3*14*14], grid_thw [N, 3])`` → ``[S, D]`` after the final RMSNorm, or a
    ``PackedVisionOutput`` with ``return_dict=True``: ``pooler_output [N, D]`` from the attention
    pooling head where the checkpoint has one, else ``None``; ``hidden_states`` (on request) the
    embeddings and each layer's output, ``L + 1`` tensors ``[S, D]``, as the reference returns them.
    """

    config: AIMv2Config

    @classmethod
    def config_from_dict(cls, config_dict: dict) -> AIMv2Config:
        return config_from_hf_dict(config_dict)

    def build(self, config: AIMv2Config) -> None:
        self.embeddings = AIMv2Embeddings(config)
        self.encoder = AIMv2Encoder(config)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = AIMv2AttentionPoolingHead(config) if config.use_head else None

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names → packvit names, the one place where they differ.

        The vision tower of an ``Aimv2Model`` lives under ``vision_model.`` (its text tower and
        projections are dropped). The Conv2d patch embedding ``[D, C, p, p]`` becomes a Linear over
        (p, p, C) patches; q/k/v fuse into ``attention.qkv`` and ``out_proj`` becomes
        ``attention.proj``; gate/up fuse into ``ffn.gate_up`` and ``down_proj`` becomes ``ffn.down``.
        A configuration that asks for a head on a checkpoint without head weights (the plain
        checkpoints) gets no head.
        """
        if any(key.startswith("vision_model.") for key in state):
            state = strip_prefix(state, ("vision_model.",))
        config = self.config
        has_head = any(key.startswith("head.") for key in state)
        config.use_head = config.use_head and has_head
        if not config.use_head:
            state = {key: value for key, value in state.items() if not key.startswith("head.")}
        if not config.is_native and "embeddings.position_embedding.weight" not in state:
            raise ValueError(
                "the checkpoint's config describes a learned position table (is_native false) but it holds "
                "no embeddings.position_embedding.weight; set is_native true in config.json for a native checkpoint"
            )
        conv = state.pop("embeddings.patch_embed.weight")  # [D, C, p, p]
        state["embeddings.patch_embed.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)  # [D, p*p*C]
        for i in range(config.num_hidden_layers):
            layer = f"encoder.layers.{i}"
            fuse_linear(state, f"{layer}.attention.qkv", [f"{layer}.attention.{n}_proj" for n in "qkv"], config.qkv_bias)
            for suffix in ("weight", "bias"):
                if f"{layer}.attention.out_proj.{suffix}" in state:
                    state[f"{layer}.attention.proj.{suffix}"] = state.pop(f"{layer}.attention.out_proj.{suffix}")
            fuse_linear(state, f"{layer}.ffn.gate_up", [f"{layer}.ffn.gate_proj", f"{layer}.ffn.up_proj"], config.mlp_bias)
            for suffix in ("weight", "bias"):
                if f"{layer}.ffn.down_proj.{suffix}" in state:
                    state[f"{layer}.ffn.down.{suffix}"] = state.pop(f"{layer}.ffn.down_proj.{suffix}")
        return state

    def forward(self, hidden_states: torch.Tensor, grid_thw, *, return_dict: bool = False,
                output_hidden_states: bool = False, interpolate_pos_encoding: bool = False):
        """``hidden_states [S, 3*p*p]`` (packed patches), ``grid_thw [N, 3]`` → ``[S, D]`` or
        ``PackedVisionOutput``. ``interpolate_pos_encoding`` (learned tables only) resizes the table
        to each image's grid instead of raising; the reference has no such option."""
        grid_thw = validate_grid_thw(grid_thw)
        if (grid_thw[:, 0] != 1).any():
            raise ValueError(
                f"AIMv2 encodes images: every grid_thw row needs t = 1, got {grid_thw[grid_thw[:, 0] != 1][0].tolist()}; "
                f"pass video frames as separate images (rows (1, h, w))"
            )
        validate_patches(hidden_states, grid_thw, self.config.patch_dim, self.device)
        lengths = item_token_counts(grid_thw)
        context = VarlenContext.from_lengths(lengths, hidden_states.device, backend=self.attention_backend)

        x = self.embeddings(hidden_states.to(self.dtype), grid_thw, interpolate_pos_encoding)  # [S, D]
        all_hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = run_layer(layer, x, context, compiled=self.compile_layers)
            if output_hidden_states:
                all_hidden.append(x)
        x = self.rms_norm(x)
        if not return_dict:
            return x
        pooled = self.head(x, context) if self.head is not None else None
        return PackedVisionOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
