"""SigLIP2 NaFlex on packed sequences.

The vision tower of google/siglip2-*-patch16-naflex: a pre-LayerNorm ViT that takes images at
their native aspect ratio. Each image arrives as ``h * w`` patches flattened (row-in-patch,
column-in-patch, channel); a linear projection embeds them, and the learned 16x16 position table
is resized to the image's (h, w) grid and added. Images never see each other: every image is its
own attention segment. After the final LayerNorm a multihead attention-pooling (MAP) head gives
one vector per image.

Inputs: ``patches [total_patches, p*p*3]`` and ``grid_thw [num_items, 3]``. A row with ``t > 1``
is ``t`` frames of one grid, each encoded exactly as an image of its own (its own attention
segment, its own pooled vector): SigLIP2 is an image model and has no notion of time. So
``last_hidden_state`` keeps one row per input patch, in input order, while ``pooler_output`` has
one row per frame, ``sum(t)`` rows in all: one row per item when every ``t`` is 1; split it per
item with ``torch.split(pooler_output, grid_thw[:, 0].tolist())``.

Position tables are interpolated in float32 on every device and cast to the parameter dtype once.
That is the reference's CPU behaviour exactly, and independent of the device. On CUDA the
reference interpolates a bf16 table in bf16, rounding between its passes: for a bf16 so400m-sized
table resized to a grid other than 16x16, about half the entries differ from packvit's by a few
bf16 steps (at most 1e-3 at 40x40); the native 16x16 grid is an exact copy in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ACTIVATIONS, AttentionPoolingHead, FusedQKVSelfAttention, Mlp, VarlenContext, fuse_linear, run_layer
from ..packing import offsets_within_items, to_device, validate_grid_thw, validate_patches
from .base import PackedVisionModel, PackedVisionOutput, strip_prefix

__all__ = [
    "Siglip2NaflexConfig",
    "Siglip2NaflexEmbeddings",
    "Siglip2EncoderLayer",
    "Siglip2Encoder",
    "Siglip2NaflexPacking",
    "position_rows",
]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Siglip2NaflexConfig:
    """The vision tower's hyper-parameters (defaults: google/siglip2-base-patch16-naflex)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} attention heads")
        if self.position_grid_size ** 2 != self.num_patches:
            raise ValueError(f"num_patches {self.num_patches} is not a square: the position table must be a square grid")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; packvit knows {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def position_grid_size(self) -> int:
        """Side of the learned square position table (16 for the released checkpoints)."""
        return round(self.num_patches ** 0.5)

    @classmethod
    def from_vision_config(cls, vision_config: dict) -> "Siglip2NaflexConfig":
        """From a ``Siglip2VisionConfig`` dict; missing keys take transformers' defaults."""
        values = {f.name: vision_config[f.name] for f in fields(cls) if vision_config.get(f.name) is not None}
        patch_size = values.get("patch_size", cls.patch_size)
        if isinstance(patch_size, (list, tuple)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"patch_size {patch_size} is not square; SigLIP2 NaFlex uses square patches")
            values["patch_size"] = int(patch_size[0])
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Embeddings


def position_rows(grid_thw: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Where each patch reads its position embedding, computed on the host.

    Returns the distinct ``(h, w)`` grids and ``rows [total_patches]`` (int64): indices into the
    concatenation of the resized tables of those grids, in that order (``h*w`` rows each, row-major).
    Every frame of an item reads the same rows.
    """
    distinct, inverse = torch.unique(grid_thw[:, 1:], dim=0, return_inverse=True)  # [G, 2], [N]
    table_sizes = distinct.prod(dim=1)  # [G]
    table_starts = table_sizes.cumsum(0) - table_sizes  # [G]
    counts = grid_thw.prod(dim=1).numpy()  # [N] patches per item
    frame_sizes = table_sizes[inverse].numpy()  # [N]
    rows = np.repeat(table_starts[inverse].numpy(), counts) + offsets_within_items(counts) % np.repeat(frame_sizes, counts)
    return [tuple(grid) for grid in distinct.tolist()], torch.from_numpy(rows)


#: resized position tables kept across forwards (least recently used dropped first): NaFlex makes
#: many distinct grids, and each table is h*w*D values (9 MB for so400m at 4096 patches in bf16)
POSITION_CACHE_SIZE = 64


class Siglip2NaflexEmbeddings(nn.Module):
    """Linear patch embedding plus the learned position table resized to each image's grid.

    The table ``position_embedding.weight [G*G, D]`` is a row-major G x G grid; for an (h, w) image
    it is resized with ``F.interpolate(bilinear, align_corners=False, antialias=True)`` (antialias
    matters when shrinking). One resize per distinct grid per forward; with autograd off the
    resized tables are kept across forwards, keyed by grid, and dropped as soon as the table's
    storage, version counter (bumped by in-place updates such as optimiser steps and
    ``load_state_dict``), device or dtype changes. An edit through ``.data`` bypasses the version
    counter: call ``clear_position_cache()`` after one.
    """

    def __init__(self, config: Siglip2NaflexConfig):
        super().__init__()
        self.position_grid_size = config.position_grid_size
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)
        self.clear_position_cache()

    def clear_position_cache(self) -> None:
        self._position_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._position_cache_key: tuple | None = None
        self._position_cache_source: torch.Tensor | None = None

    def resize_position_table(self, height: int, width: int) -> torch.Tensor:
        """The table resized to an (h, w) grid: ``[h*w, D]`` in the parameter dtype."""
        weight = self.position_embedding.weight
        side, dim = self.position_grid_size, weight.shape[-1]
        # [G*G, D] → [G, G, D] → [1, D, G, G] (a channels-last view, as the reference passes it)
        grid = weight.reshape(side, side, dim).permute(2, 0, 1).unsqueeze(0).float()
        resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        # [1, D, h, w] → [h*w, D]
        return resized.reshape(dim, height * width).transpose(0, 1).to(weight.dtype)

    def _cached_position_table(self, height: int, width: int) -> torch.Tensor:
        weight = self.position_embedding.weight
        if torch.is_grad_enabled() or weight.is_inference() or torch.compiler.is_compiling():
            return self.resize_position_table(height, width)
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if key != self._position_cache_key:
            self.clear_position_cache()
            # holding the source keeps its storage alive, so a new table cannot reuse its address
            self._position_cache_key, self._position_cache_source = key, weight.detach()
        cache = self._position_cache
        if (height, width) in cache:
            cache[(height, width)] = cache.pop((height, width))  # most recently used last
        else:
            if len(cache) >= POSITION_CACHE_SIZE:
                cache.pop(next(iter(cache)))  # least recently used
            cache[(height, width)] = self.resize_position_table(height, width)
        return cache[(height, width)]

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``patches [S, p*p*C]`` and a host ``grid_thw [N, 3]`` → ``[S, D]``."""
        weight = self.patch_embedding.weight
        grids, rows = position_rows(grid_thw)
        tables = [self._cached_position_table(h, w) for h, w in grids]
        table = tables[0] if len(tables) == 1 else torch.cat(tables)  # [sum of h*w over distinct grids, D]
        positions = table.index_select(0, to_device(rows, weight.device))  # [S, D]
        return self.patch_embedding(patches.to(weight.dtype)) + positions


# ---------------------------------------------------------------------------------------------
# Encoder


class Siglip2EncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (tanh GELU MLP)."""

    # Eager unless asked: the eager MLP already fuses its GELU into the matrix product, and the
    # compiler's LayerNorm over 1152 channels (so400m) is a looped reduction, slower than eager's
    # (H200, `mixed`: 331.6 ms a pass eager against 361.0 ms compiled).
    compile_by_default = False

    def __init__(self, config: Siglip2NaflexConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = FusedQKVSelfAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, context: VarlenContext) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), context)
        return x + self.mlp(self.layer_norm2(x))


class Siglip2Encoder(nn.Module):
    """The stack of encoder layers (``encoder.layers.{i}``, as in the checkpoints)."""

    def __init__(self, config: Siglip2NaflexConfig):
        super().__init__()
        self.layers = nn.ModuleList(Siglip2EncoderLayer(config) for _ in range(config.num_hidden_layers))


# ---------------------------------------------------------------------------------------------
# Model


class Siglip2NaflexPacking(PackedVisionModel):
    """SigLIP2 NaFlex vision tower on packed patches.

    ``Siglip2NaflexPacking(ckpt="google/siglip2-so400m-patch16-naflex")`` (or a local directory)
    loads a full SigLIP2 checkpoint (its text tower is ignored) or a vision-only
    ``Siglip2VisionModel`` checkpoint; ``Siglip2NaflexPacking(Siglip2NaflexConfig(...))`` builds
    random weights. bf16 on CUDA and float32 on the CPU unless ``dtype`` says otherwise.
    """

    config: Siglip2NaflexConfig

    @classmethod
    def config_from_dict(cls, config_dict: dict) -> Siglip2NaflexConfig:
        model_type = config_dict.get("model_type")
        if model_type == "siglip2":
            if not isinstance(config_dict.get("vision_config"), dict):
                raise ValueError("this SigLIP2 config.json has no vision_config; it cannot describe a vision tower")
            return Siglip2NaflexConfig.from_vision_config(config_dict["vision_config"])
        if model_type == "siglip2_vision_model":
            return Siglip2NaflexConfig.from_vision_config(config_dict)
        hint = (
            " SigLIP (model_type 'siglip', e.g. google/siglip2-*-patch16-224) is the fixed-resolution model "
            "with a convolutional patch embedding, not NaFlex." if model_type in ("siglip", "siglip_vision_model") else ""
        )
        raise ValueError(
            f"the checkpoint is not a SigLIP2 NaFlex checkpoint: its config.json has model_type {model_type!r} "
            f"(architectures {config_dict.get('architectures')}), expected 'siglip2' or 'siglip2_vision_model'."
            f"{hint} Load google/siglip2-*-patch16-naflex, or use the packvit class of that model family."
        )

    def build(self, config: Siglip2NaflexConfig) -> None:
        self.embeddings = Siglip2NaflexEmbeddings(config)
        self.encoder = Siglip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = (
            AttentionPoolingHead(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            )
            if config.vision_use_head
            else None
        )

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint keys → packvit keys.

        Full SigLIP2 checkpoints (and vision-only ones saved by transformers 4.x) hold the tower
        under ``vision_model.``; transformers 5 saves ``Siglip2VisionModel`` without a prefix. Per
        layer, ``self_attn.{q,k,v}_proj`` become one ``self_attn.qkv`` (rows q, k, v) and
        ``self_attn.out_proj`` becomes ``self_attn.proj``; the head's ``layernorm`` is its ``norm``.
        Everything else (text tower, logit scale and bias, classifier) is dropped.
        """
        if any(key.startswith("vision_model.") for key in state):
            state = strip_prefix(state, ("vision_model.",))
        state = {key: value for key, value in state.items() if key.split(".")[0] in ("embeddings", "encoder", "post_layernorm", "head")}
        layer_keys = (re.fullmatch(r"(encoder\.layers\.\d+\.self_attn)\.q_proj\.weight", key) for key in list(state))
        for attention in [match.group(1) for match in layer_keys if match]:
            fuse_linear(state, f"{attention}.qkv", [f"{attention}.{name}_proj" for name in "qkv"], with_bias=True)
        renames = ((r"\.self_attn\.out_proj\.", ".self_attn.proj."), (r"^head\.layernorm\.", "head.norm."))
        mapped = {}
        for key, value in state.items():
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key)
            mapped[key] = value
        return mapped

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        *,
        return_dict: bool = False,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | PackedVisionOutput:
        """``hidden_states [total_patches, p*p*3]`` (patches, (p, p, C) layout) and ``grid_thw
        [num_items, 3]`` → ``[total_patches, hidden]`` after ``post_layernorm``.

        ``return_dict=True`` → ``PackedVisionOutput`` with ``pooler_output [sum(t), hidden]`` (one
        MAP-pooled row per frame; ``None`` without a head) and, with ``output_hidden_states``,
        ``hidden_states``: the embeddings and each layer's output, ``[total_patches, hidden]`` each,
        before ``post_layernorm``.
        """
        grid_thw = validate_grid_thw(grid_thw)
        validate_patches(hidden_states, grid_thw, self.config.patch_dim, self.device)
        frame_lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # one segment per frame
        context = VarlenContext.from_lengths(frame_lengths.tolist(), self.device, backend=self.attention_backend)

        x = self.embeddings(hidden_states, grid_thw)  # [S, D]
        all_hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = run_layer(layer, x, context, compiled=self.compile_layers)
            if output_hidden_states:
                all_hidden_states.append(x)
        last_hidden_state = self.post_layernorm(x)
        if not return_dict:
            return last_hidden_state
        pooled = self.head(last_hidden_state, context) if self.head is not None else None  # [sum(t), D]
        return PackedVisionOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )
