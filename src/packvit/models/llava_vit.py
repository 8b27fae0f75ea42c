"""OneVision Encoder (LlavaViT): a pre-LN ViT with a 3-D (t, h, w) RoPE, on packed sequences.

``LlavaViTPackingModel`` runs images and videos of any sizes packed into one sequence
``[total_patches, C*p*p]`` (patches in the (C, p, p) layout) described by ``grid_thw [num_items, 3]``;
each item (a whole video included) is one attention segment. ``LlavaViTModel`` is the standard
dense model with the published checkpoint's layout (``lmms-lab-encoder/onevision-encoder-large``),
the reference the packed model is checked against.

The forward pass of both:

1. patch embedding: a bias-free Conv2d applied per frame (token order t, row, column);
2. ``layernorm_pre``;
3. pre-norm blocks ``x + out_proj(attention(rope(q), rope(k), v))`` and ``x + fc2(gelu(fc1(x)))``,
   with the OneVision 3-D RoPE (``packvit.rope``) over integer (t, row, column) positions;
4. if ``use_head``: ``layernorm_post`` over all tokens, then a multihead attention-pooling head
   (a learned probe, RMSNorm, MLP) giving one vector per item.

``hidden_states`` holds ``num_hidden_layers + 1`` entries: [0] is the ``layernorm_pre`` output and
[k] the output of layer k; none includes ``layernorm_post``.

Videos were trained on a virtual timeline of 64 slots; ``timeline_slots`` maps sampled frame
indices onto it and ``timeline_positions`` turns slots into ``patch_positions``.

The file reads top to bottom: configuration and sizes, positions, the packed model, the standard
model, checkpoint layouts and their key mappings, timm registration.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..layers import (
    ACTIVATIONS, AttentionPoolingHead, FusedQKVSelfAttention, Mlp, RMSNorm, VarlenContext, fuse_linear, run_layer,
)
from ..packing import item_token_counts, to_device, token_positions, validate_grid_thw, validate_patches
from ..rope import apply_onevision_rope, onevision_rope_axis_widths, onevision_rope_cos_sin
from .base import read_config_dict, read_state_dict, resolve_checkpoint

__all__ = [
    "LlavaViTConfig",
    "LlavaViTPackingConfig",
    "LLAVA_VIT_SIZES",
    "llava_vit_packing_config",
    "timeline_slots",
    "timeline_positions",
    "LlavaViTPackingModel",
    "LlavaViTModel",
    "checkpoint_layout",
    "layout_of_keys",
    "packing_config_from_published",
    "config_fields",
    "map_published_to_packing",
    "map_training_to_published",
    "map_training_to_packing",
    "config_from_training_state",
    "register_timm_models",
    "hf_llava_vit_packing_small_ln",
    "hf_llava_vit_packing_base_ln",
    "hf_llava_vit_packing_large_ln",
    "hf_llava_vit_packing_huge_ln",
    "hf_llava_vit_packing_giant_ln",
]

# =============================================================================================
# Configuration and sizes


NORM_TYPES = ("layer_norm", "rms_norm")


class LlavaViTConfig(PreTrainedConfig):
    """Configuration of the published OneVision Encoder (``model_type`` ``onevision_encoder``).

    Defaults are ``onevision-encoder-large``: 1024 wide, 24 layers of 16 heads, MLP 4096, patch 14,
    images of 448, RoPE theta 1e4 over a 64-slot timeline, with the attention-pooling head.
    """

    model_type = "onevision_encoder"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 14,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layer_norm_type: str = "layer_norm",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        rope_temporal_size: int = 64,
        use_head: bool = True,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.rope_temporal_size = rope_temporal_size
        self.use_head = use_head
        super().__init__(**kwargs)


class LlavaViTPackingConfig(LlavaViTConfig):
    """Configuration of the packed model (``model_type`` ``llava_vit_packing``).

    The published fields plus ``temporal_patch_size`` and ``spatial_merge_size`` (both 1, kept for
    the packing checkpoint format; patches are always one frame of p x p pixels).
    """

    model_type = "llava_vit_packing"

    def __init__(self, temporal_patch_size: int = 1, spatial_merge_size: int = 1, **kwargs):
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
        super().__init__(**kwargs)


#: the ``hf_llava_vit_packing_{size}_ln`` family: (hidden, layers, heads, mlp, patch)
LLAVA_VIT_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "small": (384, 6, 6, 1536, 16),
    "base": (768, 12, 12, 3072, 16),
    "large": (1024, 24, 16, 4096, 14),
    "huge": (1280, 32, 20, 5120, 14),
    "giant": (1536, 40, 16, 6144, 14),
}


def llava_vit_packing_config(name: str, **overrides) -> LlavaViTPackingConfig:
    """The configuration of a named size (``"large"`` or ``"hf_llava_vit_packing_large_ln"``).

    All sizes use GELU, LayerNorm and the pooling head; ``overrides`` replace any field.
    """
    size = name.removeprefix("hf_llava_vit_packing_").removesuffix("_ln")
    if size not in LLAVA_VIT_SIZES:
        raise ValueError(f"unknown OneVision Encoder size {name!r}; packvit knows {sorted(LLAVA_VIT_SIZES)}")
    hidden, layers, heads, mlp, patch = LLAVA_VIT_SIZES[size]
    fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                  patch_size=patch, hidden_act="gelu", layer_norm_type="layer_norm", use_head=True)
    return LlavaViTPackingConfig(**{**fields, **overrides})


def _check_config(config: LlavaViTConfig) -> int:
    """Validates what the modules cannot express; returns head_dim."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
        )
    if config.layer_norm_type not in NORM_TYPES:
        raise ValueError(f"layer_norm_type must be one of {NORM_TYPES}, got {config.layer_norm_type!r}")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; packvit knows {sorted(ACTIVATIONS)}")
    for name in ("temporal_patch_size", "spatial_merge_size"):
        if getattr(config, name, 1) != 1:
            raise ValueError(
                f"{name}={getattr(config, name)} is not supported: the OneVision Encoder embeds one frame per "
                f"patch and merges no patches; set it to 1"
            )
    head_dim = config.hidden_size // config.num_attention_heads
    onevision_rope_axis_widths(head_dim)
    return head_dim


# =============================================================================================
# Positions: images (0, row, column); videos on the 64-slot timeline


def timeline_slots(frame_indices: Sequence[int] | torch.Tensor, total_frames: int, num_slots: int = 64) -> torch.Tensor:
    """Timeline slot of each sampled frame: ``round(index / (total_frames - 1) * (num_slots - 1))``.

    ``frame_indices`` are indices into the source video (``0 <= index < total_frames``); returns
    int64 ``[len(frame_indices)]``. Rounding (half to even, as Python's ``round``) is the rule of
    the published evaluation and conversion code, and it puts a frame on its nearest slot;
    truncating ``linspace(0, 63, n)`` (the README's recipe) gives the same slots for 8 uniform
    frames but shifts others down by up to one slot (16 frames: 0, 4, 8, 12, 16, 21 ... instead of
    0, 4, 8, 13, 17, 21 ...). A one-frame video sits on slot 0.
    """
    indices = torch.as_tensor(frame_indices, dtype=torch.float64).reshape(-1)
    if total_frames < 1:
        raise ValueError(f"total_frames must be at least 1, got {total_frames}")
    if indices.numel() and (indices.min() < 0 or indices.max() > total_frames - 1):
        raise ValueError(
            f"frame indices must lie in [0, {total_frames - 1}] for a video of {total_frames} frames, got "
            f"values from {indices.min().item():g} to {indices.max().item():g}"
        )
    if total_frames == 1:
        return torch.zeros(indices.shape, dtype=torch.int64)
    return torch.round(indices / (total_frames - 1) * (num_slots - 1)).to(torch.int64)


def timeline_positions(slots: Sequence[int] | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``patch_positions [T*h*w, 3]`` (slot, row, column) of a video whose frame i sits on ``slots[i]``."""
    slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frame = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [h*w, 2]
    # [T, 1, 1] and [1, h*w, 2] → [T, h*w, 3] → [T*h*w, 3]
    t = slots[:, None, None].expand(-1, height * width, 1)
    return torch.cat([t, frame[None].expand(slots.numel(), -1, -1)], dim=-1).reshape(-1, 3)


def _norm(config: LlavaViTConfig) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


# =============================================================================================
# The packed model


class LlavaViTPatchEmbed(nn.Module):
    """The bias-free Conv2d patch embedding used as one Linear: ``[S, C*p*p]`` → ``[S, D]``."""

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [D, C, p, p] → [D, C*p*p], the (C, p, p) patch layout
        return F.linear(patches.to(weight.dtype), weight)


class LlavaViTPackingLayer(nn.Module):
    """Pre-norm block on packed tokens ``[S, D]``."""

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layer_norm1 = _norm(config)
        self.self_attn = FusedQKVSelfAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = _norm(config)
        self.mlp = Mlp(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, context: VarlenContext, rope) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), context, rope)
        return x + self.mlp(self.layer_norm2(x))


class LlavaViTPackingEncoder(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlavaViTPackingLayer(config) for _ in range(config.num_hidden_layers))


class LlavaViTPackingModel(PreTrainedModel):
    """OneVision Encoder on packed sequences.

    ``model(hidden_states [S, C*p*p], grid_thw [N, 3])`` → ``BaseModelOutputWithPooling`` with
    ``last_hidden_state [S, D]``, ``pooler_output [N, D]`` (``None`` without the head) and, on
    request, ``hidden_states`` (``num_hidden_layers + 1`` tensors ``[S, D]``).

    ``from_pretrained`` loads the packing format and the published checkpoint layout alike.
    """

    config_class = LlavaViTPackingConfig
    main_input_name = "hidden_states"
    _no_split_modules = ["LlavaViTPackingLayer"]

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__(config)
        self.head_dim = _check_config(config)
        #: attention backend for every varlen call (None: automatic; see packvit.attention)
        self.attention_backend: str | None = None
        #: run each encoder layer through torch.compile: True, False, or None for automatic
        #: (compiled for CUDA inference; see packvit.layers.layers_compiled)
        self.compile_layers: bool | None = None
        self.patch_embed = LlavaViTPatchEmbed(config)
        self.layernorm_pre = _norm(config)
        self.encoder = LlavaViTPackingEncoder(config)
        if config.use_head:
            self.layernorm_post = _norm(config)
            head_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.head = AttentionPoolingHead(config.hidden_size, config.num_attention_heads,
                                             config.intermediate_size, config.hidden_act, head_norm)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AttentionPoolingHead):
            init.normal_(module.probe, std=self.config.initializer_range)
            init.xavier_uniform_(module.attention.in_proj_weight)
            init.zeros_(module.attention.in_proj_bias)

    @property
    def patch_dim(self) -> int:
        return self.config.num_channels * self.config.patch_size**2

    def _positions(self, grid_thw: torch.Tensor, patch_positions, total: int, device: torch.device) -> torch.Tensor:
        """(t, row, column) of every token ``[S, 3]`` on ``device``: from the grid, or as given."""
        if patch_positions is None:
            return to_device(token_positions(grid_thw), device)  # host int64 [S, 3] → device
        if not isinstance(patch_positions, torch.Tensor) or tuple(patch_positions.shape) != (total, 3):
            shape = tuple(patch_positions.shape) if isinstance(patch_positions, torch.Tensor) else type(patch_positions).__name__
            raise ValueError(
                f"patch_positions must be [total_patches, 3] = [{total}, 3] (t, row, column per patch, in "
                f"packed order), got {shape}; build video positions with packvit.models.llava_vit.timeline_positions."
            )
        if patch_positions.is_floating_point() or patch_positions.dtype == torch.bool:
            raise ValueError(
                f"patch_positions must hold integer (t, row, column) indices, got {patch_positions.dtype}; "
                f"pass a torch.long tensor"
            )
        if patch_positions.device.type == "cpu" and (patch_positions < 0).any():
            raise ValueError("patch_positions must be non-negative (t in the 64-slot timeline, row and column in patches)")
        return to_device(patch_positions, device) if patch_positions.device.type == "cpu" else patch_positions.to(device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple:
        """``hidden_states [S, C*p*p]`` (patches, (C, p, p) layout), ``grid_thw [N, 3]`` (host), and
        optionally ``patch_positions [S, 3]`` replacing the (t, row, column) of every patch."""
        grid_thw = validate_grid_thw(grid_thw)
        validate_patches(hidden_states, grid_thw, self.patch_dim, self.device)
        device = hidden_states.device
        context = VarlenContext.from_lengths(item_token_counts(grid_thw), device, backend=self.attention_backend)
        positions = self._positions(grid_thw, patch_positions, hidden_states.shape[0], device)
        cos, sin = onevision_rope_cos_sin(positions, self.head_dim, self.config.rope_theta)  # [S, hd] float32 each

        def rope(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_onevision_rope(q, cos, sin), apply_onevision_rope(k, cos, sin)

        x = self.layernorm_pre(self.patch_embed(hidden_states))  # [S, C*p*p] → [S, D]
        all_hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = run_layer(layer, x, context, rope, compiled=self.compile_layers)
            if output_hidden_states:
                all_hidden.append(x)
        pooled = None
        if self.config.use_head:
            x = self.layernorm_post(x)
            pooled = self.head(x, context)  # [N, D]
        output = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=tuple(all_hidden) if all_hidden else None
        )
        return output if return_dict else output.to_tuple()

    # --- loading: the packing format through transformers, the published layout mapped once here

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads the packing format, or the published checkpoint layout (mapped by
        ``map_published_to_packing``), from a directory or hub id."""
        directory = resolve_checkpoint(pretrained_model_name_or_path)
        layout = checkpoint_layout(directory)
        if layout == "published":
            return cls.from_published(directory, **kwargs)
        if layout == "training":
            raise ValueError(
                f"{directory} holds a training-format state dict (conv1, transformer.layers.*); convert it "
                f"first with `packvit convert llava-vit --src {directory} --dst OUT --from training`"
            )
        return super().from_pretrained(directory, *model_args, **kwargs)

    @classmethod
    def from_published(cls, directory, dtype=None, torch_dtype=None, device_map=None) -> "LlavaViTPackingModel":
        """Builds the packed model from a published-layout checkpoint directory.

        ``dtype`` (or ``"auto"``/``None``: the checkpoint's) and ``device_map`` (one device).
        """
        directory = Path(directory)
        config = packing_config_from_published(read_config_dict(directory))
        try:
            state = map_published_to_packing(read_state_dict(directory))
        except KeyError as error:
            raise ValueError(
                f"checkpoint {directory} has no tensor {error.args[0]!r}; it is not a complete OneVision Encoder "
                f"checkpoint in the published layout"
            ) from error
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{directory} does not match the configured LlavaViTPackingModel: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}; check use_head and num_hidden_layers in its config.json"
            )
        model.load_state_dict(state, strict=True, assign=True)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device_map is not None:
            model.to(device_map)
        return model.eval()


# =============================================================================================
# The standard model: published layout, dense batches, SDPA (the reference)


def _standard_rope_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``[..., head_dim / 2]`` for positions ``[..., 3]``: [t w_t | r w_h | c w_w]."""
    half = head_dim // 2
    unit = half // 16
    sizes = (4 * unit, 6 * unit, 6 * unit)
    ladders = [1.0 / (theta ** (torch.arange(size, dtype=torch.float32, device=positions.device) / size)) for size in sizes]
    positions = positions.float()
    return torch.cat([positions[..., axis, None] * ladders[axis] for axis in range(3)], dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``."""
    x_even, x_odd = x[..., ::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def _apply_standard_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, hd]``, ``freqs [B, L, hd/2]``: ``x cos(a) + rot(x) sin(a)``, ``a = [f | f]``,
    cos and sin cast to ``x.dtype`` first."""
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, hd]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + _rotate_interleaved(x) * sin


class LlavaViTEmbeddings(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` → ``([B, T*h*w, D], (T, h, w))``."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(2)
        batch, channels, frames, height, width = pixel_values.shape
        # [B, C, T, H, W] → [B*T, C, H, W]: the conv runs per frame
        frames_flat = pixel_values.transpose(1, 2).reshape(batch * frames, channels, height, width)
        embedded = self.patch_embedding(frames_flat.to(self.patch_embedding.weight.dtype))  # [B*T, D, h, w]
        h, w = embedded.shape[-2:]
        # [B*T, D, h, w] → [B*T, h*w, D] → [B, T*h*w, D]
        tokens = embedded.flatten(2).transpose(1, 2).reshape(batch, frames * h * w, -1)
        return tokens, (frames, h, w)


class LlavaViTAttention(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        # [B, L, D] → [B, H, L, hd]
        q, k, v = (proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_standard_rope(q, freqs), _apply_standard_rope(k, freqs)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class LlavaViTMLP(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LlavaViTEncoderLayer(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layer_norm1 = _norm(config)
        self.self_attn = LlavaViTAttention(config)
        self.layer_norm2 = _norm(config)
        self.mlp = LlavaViTMLP(config)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), freqs)
        return x + self.mlp(self.layer_norm2(x))


class LlavaViTEncoder(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlavaViTEncoderLayer(config) for _ in range(config.num_hidden_layers))


class LlavaViTPoolingHead(nn.Module):
    """``out = a + mlp(norm(a))`` with ``a = MultiheadAttention(probe, x, x)``; ``[B, L, D]`` → ``[B, D]``."""

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, config.num_attention_heads, batch_first=True)
        self.norm = RMSNorm(dim, eps=config.layer_norm_eps)
        self.mlp = LlavaViTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # [B, 1, D]
        attended = self.attention(probe, x, x, need_weights=False)[0]
        out = attended + self.mlp(self.norm(attended))
        return out[:, 0]


class LlavaViTModel(PreTrainedModel):
    """The OneVision Encoder with the published checkpoint's layout, on dense batches.

    ``model(pixel_values)`` with images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``; optional
    ``visible_indices [B, L]`` (flat indices ``t*h*w + r*w + c`` into a ``rope_temporal_size x h x w``
    grid: they select the RoPE positions, and the tokens too when L differs from T*h*w) and
    ``patch_positions [B, L, 3]`` (explicit (t, row, column), overriding both). Without either, frame
    i of a video sits at t = i.
    """

    config_class = LlavaViTConfig
    base_model_prefix = "onevision_encoder"
    main_input_name = "pixel_values"
    _no_split_modules = ["LlavaViTEncoderLayer"]

    def __init__(self, config: LlavaViTConfig):
        super().__init__(config)
        self.head_dim = _check_config(config)
        self.embeddings = LlavaViTEmbeddings(config)
        self.layernorm_pre = _norm(config)
        self.encoder = LlavaViTEncoder(config)
        if config.use_head:
            self.layernorm_post = _norm(config)
            self.head = LlavaViTPoolingHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LlavaViTPoolingHead):
            init.normal_(module.probe, std=self.config.initializer_range)

    def _rope_freqs(self, grid: tuple[int, int, int], batch: int, visible_indices, patch_positions, device) -> torch.Tensor:
        """RoPE angles ``[B, L, hd/2]``."""
        frames, h, w = grid
        if patch_positions is not None:
            return _standard_rope_freqs(patch_positions.to(device), self.head_dim, self.config.rope_theta)
        if visible_indices is not None:
            t, r, c = torch.meshgrid(torch.arange(self.config.rope_temporal_size), torch.arange(h), torch.arange(w), indexing="ij")
            grid_positions = torch.stack([t, r, c], dim=-1).reshape(-1, 3).to(device)  # [64*h*w, 3]
            table = _standard_rope_freqs(grid_positions, self.head_dim, self.config.rope_theta)
            return table[visible_indices.to(device)]  # [B, L, hd/2]
        t, r, c = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
        positions = torch.stack([t, r, c], dim=-1).reshape(1, -1, 3).expand(batch, -1, -1).to(device)
        return _standard_rope_freqs(positions, self.head_dim, self.config.rope_theta)

    def forward(
        self,
        pixel_values: torch.Tensor,
        visible_indices: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple:
        x, grid = self.embeddings(pixel_values)  # [B, T*h*w, D]
        batch, total, dim = x.shape
        if visible_indices is not None and visible_indices.shape[1] != total:
            x = torch.gather(x, 1, visible_indices.to(x.device)[..., None].expand(-1, -1, dim))  # [B, L, D]
        freqs = self._rope_freqs(grid, batch, visible_indices, patch_positions, x.device)
        x = self.layernorm_pre(x)
        all_hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, freqs)
            if output_hidden_states:
                all_hidden.append(x)
        pooled = None
        if self.config.use_head:
            x = self.layernorm_post(x)
            pooled = self.head(x)  # [B, D]
        output = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=tuple(all_hidden) if all_hidden else None
        )
        return output if return_dict else output.to_tuple()


# =============================================================================================
# Checkpoint layouts and the key mappings between them
#
# published (OneVisionEncoderModel, LlavaViTModel here): embeddings.patch_embedding, separate
#   self_attn.{q,k,v,out}_proj, keys optionally prefixed "onevision_encoder." (or "llava_vit.");
# packing (LlavaViTPackingModel): patch_embed.proj, fused self_attn.qkv (rows q|k|v), self_attn.proj;
# training (the original training code): conv1, ln_pre/ln_post, transformer.layers.{i}.{ln_1, ln_2,
#   attn.in_proj (fused q|k|v), attn.out_proj, mlp.0, mlp.2}, head.* as published.

PUBLISHED_PREFIXES = ("onevision_encoder.", "llava_vit.")
PUBLISHED_MODEL_TYPES = ("onevision_encoder", "llava_vit")


def _strip_published_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in PUBLISHED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def _layer_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix)})


def checkpoint_layout(directory) -> str:
    """``"published"``, ``"packing"`` or ``"training"``, from the key names of the safetensors files."""
    from safetensors import safe_open

    keys: set[str] = set()
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return layout_of_keys(keys, directory)


def layout_of_keys(keys, source="the checkpoint") -> str:
    keys = set(_strip_published_prefix(dict.fromkeys(keys)))
    if "embeddings.patch_embedding.weight" in keys:
        return "published"
    if "patch_embed.proj.weight" in keys:
        return "packing"
    if "conv1.weight" in keys:
        return "training"
    raise ValueError(
        f"{source} is not a OneVision Encoder checkpoint: it has none of embeddings.patch_embedding.weight "
        f"(published), patch_embed.proj.weight (packing) or conv1.weight (training); found e.g. {sorted(keys)[:5]}"
    )


def map_published_to_packing(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published keys → packing keys: q/k/v stacked into ``self_attn.qkv``, ``out_proj`` → ``proj``,
    ``embeddings.patch_embedding`` → ``patch_embed.proj``; RoPE buffers, if any, dropped."""
    state = {key: value for key, value in _strip_published_prefix(state).items() if not key.startswith("video_rope.")}
    state["patch_embed.proj.weight"] = state.pop("embeddings.patch_embedding.weight")
    for i in _layer_indices(state, "encoder.layers."):
        attn = f"encoder.layers.{i}.self_attn"
        fuse_linear(state, f"{attn}.qkv", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], with_bias=True)
        for suffix in ("weight", "bias"):
            state[f"{attn}.proj.{suffix}"] = state.pop(f"{attn}.out_proj.{suffix}")
    return state


def _rename_training_keys(state: dict[str, torch.Tensor], patch_embed: str) -> dict[str, torch.Tensor]:
    """Training names → published names, the attention left as ``self_attn.in_proj`` / ``.out_proj``."""
    renames = [("conv1.", patch_embed), ("ln_pre.", "layernorm_pre."), ("ln_post.", "layernorm_post."),
               ("transformer.layers.", "encoder.layers.")]
    inner = [(".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.0.", ".mlp.fc1."),
             (".mlp.2.", ".mlp.fc2."), (".attn.in_proj.", ".self_attn.in_proj."), (".attn.out_proj.", ".self_attn.out_proj.")]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.startswith("encoder.layers."):
            for old, new in inner:
                key = key.replace(old, new)
        out[key] = value
    return out


def map_training_to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training keys → published keys; the fused ``attn.in_proj`` split into q, k, v (3 equal row blocks)."""
    state = _rename_training_keys(state, "embeddings.patch_embedding.")
    for i in _layer_indices(state, "encoder.layers."):
        attn = f"encoder.layers.{i}.self_attn"
        for suffix in ("weight", "bias"):
            q, k, v = state.pop(f"{attn}.in_proj.{suffix}").chunk(3, dim=0)
            state[f"{attn}.q_proj.{suffix}"], state[f"{attn}.k_proj.{suffix}"], state[f"{attn}.v_proj.{suffix}"] = q, k, v
    return state


def map_training_to_packing(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training keys → packing keys; ``attn.in_proj`` kept fused as ``self_attn.qkv``."""
    state = _rename_training_keys(state, "patch_embed.proj.")
    for key in [key for key in state if ".self_attn." in key]:
        state[key.replace(".self_attn.in_proj.", ".self_attn.qkv.").replace(".self_attn.out_proj.", ".self_attn.proj.")] = state.pop(key)
    return state


def config_fields(config_dict: dict, packing: bool = True) -> dict:
    """The entries of a config dict that are OneVision Encoder fields (drops auto_map, architectures ...);
    ``packing=False`` also drops the packing-only fields."""
    names = set(inspect.signature(LlavaViTConfig.__init__).parameters)
    if packing:
        names |= set(inspect.signature(LlavaViTPackingConfig.__init__).parameters)
    names -= {"self", "kwargs"}
    return {key: value for key, value in config_dict.items() if key in names}


def packing_config_from_published(config_dict: dict) -> LlavaViTPackingConfig:
    """The packing configuration of a published ``config.json`` (``model_type`` onevision_encoder or llava_vit)."""
    model_type = config_dict.get("model_type")
    if model_type not in PUBLISHED_MODEL_TYPES + (LlavaViTPackingConfig.model_type,):
        raise ValueError(
            f"config.json has model_type {model_type!r}, not a OneVision Encoder checkpoint "
            f"(expected one of {PUBLISHED_MODEL_TYPES + (LlavaViTPackingConfig.model_type,)})"
        )
    return LlavaViTPackingConfig(**config_fields(config_dict))


def config_from_training_state(state: dict[str, torch.Tensor], num_attention_heads: int | None = None,
                               **overrides) -> LlavaViTPackingConfig:
    """The configuration of a training-format state dict, read from its shapes.

    The head count cannot be read from shapes: it is taken from ``num_attention_heads`` or, when the
    shapes match a named size (``LLAVA_VIT_SIZES``), from that size.
    """
    hidden, channels, patch, _ = state["conv1.weight"].shape
    layers = len(_layer_indices(state, "transformer.layers."))
    mlp = state["transformer.layers.0.mlp.0.weight"].shape[0]
    if num_attention_heads is None:
        matches = [heads for (d, n, heads, f, p) in LLAVA_VIT_SIZES.values() if (d, n, f, p) == (hidden, layers, mlp, patch)]
        if not matches:
            raise ValueError(
                f"cannot tell the number of attention heads of a training checkpoint with hidden {hidden}, "
                f"{layers} layers, MLP {mlp}, patch {patch} (no named size matches); pass num_attention_heads"
            )
        num_attention_heads = matches[0]
    norm_type = "layer_norm" if "ln_pre.bias" in state else "rms_norm"
    return LlavaViTPackingConfig(**{
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": mlp, "patch_size": patch,
        "num_channels": channels, "num_attention_heads": num_attention_heads, "layer_norm_type": norm_type,
        "use_head": "head.probe" in state, **overrides,
    })


# =============================================================================================
# timm registration: hf_llava_vit_packing_{small,base,large,huge,giant}_ln → LlavaViTPackingModel


def _timm_model(size: str, pretrained: bool, kwargs: dict) -> LlavaViTPackingModel:
    if pretrained:
        raise ValueError(
            f"hf_llava_vit_packing_{size}_ln has no timm weights; load a checkpoint with "
            f"LlavaViTPackingModel.from_pretrained(directory or hub id)"
        )
    for timm_option in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_option, None)
    return LlavaViTPackingModel(llava_vit_packing_config(size, **kwargs))


def hf_llava_vit_packing_small_ln(pretrained: bool = False, **kwargs) -> LlavaViTPackingModel:
    """384 wide, 6 layers, 6 heads, MLP 1536, patch 16."""
    return _timm_model("small", pretrained, kwargs)


def hf_llava_vit_packing_base_ln(pretrained: bool = False, **kwargs) -> LlavaViTPackingModel:
    """768 wide, 12 layers, 12 heads, MLP 3072, patch 16."""
    return _timm_model("base", pretrained, kwargs)


def hf_llava_vit_packing_large_ln(pretrained: bool = False, **kwargs) -> LlavaViTPackingModel:
    """1024 wide, 24 layers, 16 heads, MLP 4096, patch 14 (the published large)."""
    return _timm_model("large", pretrained, kwargs)


def hf_llava_vit_packing_huge_ln(pretrained: bool = False, **kwargs) -> LlavaViTPackingModel:
    """1280 wide, 32 layers, 20 heads, MLP 5120, patch 14."""
    return _timm_model("huge", pretrained, kwargs)


def hf_llava_vit_packing_giant_ln(pretrained: bool = False, **kwargs) -> LlavaViTPackingModel:
    """1536 wide, 40 layers, 16 heads (head_dim 96), MLP 6144, patch 14."""
    return _timm_model("giant", pretrained, kwargs)


TIMM_ENTRYPOINTS = (
    hf_llava_vit_packing_small_ln,
    hf_llava_vit_packing_base_ln,
    hf_llava_vit_packing_large_ln,
    hf_llava_vit_packing_huge_ln,
    hf_llava_vit_packing_giant_ln,
)


def register_timm_models() -> list[str]:
    """Registers the five names with timm's ``register_model`` (once); returns the names."""
    from timm.models import is_model, register_model

    for entrypoint in TIMM_ENTRYPOINTS:
        if not is_model(entrypoint.__name__):
            register_model(entrypoint)
    return [entrypoint.__name__ for entrypoint in TIMM_ENTRYPOINTS]
