"""SigLIP2 NaFlex on packed sequences.

The vision tower of google/siglip2-*-patch16-naflex: a pre-LayerNorm ViT that takes images at
their native aspect ratio. Each image arrives as ``h * w`` patches flattened (row-in-patch,
column-in-patch, channel); a linear projection embeds them, and the learned 16x16 position table
is resized to the image's (h, w) grid and added. Every image is its own attention segment. After
the final LayerNorm a multihead attention-pooling (MAP) head gives one vector per image.

SigLIP2 is an image model: every ``grid_thw`` row needs t = 1 (``PackedBatch.frames_as_items``
turns a clip's frames into images).

The position table is resized with antialiased bilinear weights computed explicitly in float32,
the same on every device (``packvit.positions.resize_table``): what transformers >= 5.24, PyTorch's
CUDA kernel and the original JAX code compute. PyTorch's CPU ``F.interpolate(antialias=True)``,
which transformers <= 5.23 called, is wrong for grids one patch wide whose height is resized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import fuse_linear, rename_prefixes, strip_prefix
from ..layers import AttentionPoolingHead, EncoderBlock, Mlp
from ..positions import TableLookup
from .base import PackedVisionModel, PackMetadata
from .config import VisionConfig

__all__ = ["Siglip2NaflexConfig", "Siglip2NaflexEmbeddings", "Siglip2NaflexPacking", "TRANSFORMERS_NAMES"]

#: transformers' SigLIP2 vision names → packvit's, as prefix templates (``{}`` a layer number) that
#: ``checkpoint.rename_prefixes`` reads both ways; q, k and v are fused into ``qkv`` before renaming
#: (their rows serve the way back, after the fused projection is split again)
TRANSFORMERS_NAMES = (
    ("encoder.layers.{}.layer_norm{}.", "blocks.{}.norm{}."),
    ("encoder.layers.{}.self_attn.qkv.", "blocks.{}.attn.qkv."),
    *((f"encoder.layers.{{}}.self_attn.{part}_proj.", f"blocks.{{}}.attn.{part}_proj.") for part in "qkv"),
    ("encoder.layers.{}.self_attn.out_proj.", "blocks.{}.attn.proj."),
    ("encoder.layers.{}.mlp.", "blocks.{}.mlp."),
    ("post_layernorm.", "final_norm."),
    ("head.layernorm.", "head.norm."),
)


@dataclass(frozen=True)
class Siglip2NaflexConfig(VisionConfig):
    """The vision tower's hyper-parameters (defaults: google/siglip2-base-patch16-naflex)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    model_types = ("siglip2_vision_model", "siglip2")
    composite_types = ("siglip2",)

    def check(self) -> None:
        if self.position_grid_size**2 != self.num_patches:
            raise ValueError(f"num_patches {self.num_patches} is not a square: the position table must be a square grid")

    @property
    def position_grid_size(self) -> int:
        """Side of the learned square position table (16 for the released checkpoints)."""
        return round(self.num_patches**0.5)


class Siglip2NaflexEmbeddings(nn.Module):
    """Linear patch embedding plus the learned position table resized to each image's grid.

    The table ``position_embedding.weight [G*G, D]`` is a row-major G x G grid, resized for the
    whole pack at once through the pack's ``position_lookup`` (antialiased bilinear weights).
    """

    def __init__(self, config: Siglip2NaflexConfig):
        super().__init__()
        self.position_grid_size = config.position_grid_size
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, patches: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """``patches [S, p*p*C]`` → ``[S, D]``."""
        return self.patch_embedding(patches) + meta.position_lookup(self.position_embedding.weight)


class Siglip2NaflexPacking(PackedVisionModel):
    """SigLIP2 NaFlex vision tower on packed patches.

    ``Siglip2NaflexPacking(ckpt="google/siglip2-so400m-patch16-naflex")`` (or a local directory)
    loads a full SigLIP2 checkpoint (its text tower is ignored) or a vision-only
    ``Siglip2VisionModel`` checkpoint; ``Siglip2NaflexPacking(Siglip2NaflexConfig(...))`` builds
    random weights. ``pooler_output``: the MAP head's vector per image (``None`` without a head).
    """

    family = "siglip2"
    config_class = Siglip2NaflexConfig
    config: Siglip2NaflexConfig

    def build(self, config: Siglip2NaflexConfig) -> None:
        dim = config.hidden_size

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, eps=config.layer_norm_eps)

        self.embeddings = Siglip2NaflexEmbeddings(config)
        # Eager blocks unless asked: the eager MLP already fuses its GELU into the matrix product,
        # and the compiler's LayerNorm over 1152 channels (so400m) is a looped reduction, slower
        # than eager's (H200, `mixed`: 331.6 ms a pass eager against 361.0 ms compiled).
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, config.num_attention_heads, norm, Mlp(dim, config.intermediate_size, config.hidden_act),
                         compile_by_default=False)
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = norm()
        self.head = (
            AttentionPoolingHead(dim, config.num_attention_heads, config.intermediate_size, config.hidden_act, norm())
            if config.vision_use_head else None
        )

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' SigLIP2 names → packvit's.

        Full SigLIP2 checkpoints (and vision-only ones saved by transformers 4.x) hold the tower
        under ``vision_model.``, beside the text tower, logit scale and bias, which are dropped;
        transformers 5 saves ``Siglip2VisionModel`` without a prefix. Any other tensor is kept, to be
        reported. Per layer ``self_attn.{q,k,v}_proj`` fuse into ``attn.qkv`` (rows q, k, v) and
        ``self_attn.out_proj`` becomes ``attn.proj``.
        """
        if "vision_model.embeddings.patch_embedding.weight" in state:
            state = {key: value for key, value in state.items()
                     if not key.startswith("text_model.") and key not in ("logit_scale", "logit_bias")}
            state = strip_prefix(state, ("vision_model.",))
        for i in range(self.config.num_hidden_layers):
            attention = f"encoder.layers.{i}.self_attn"
            state = fuse_linear(state, f"{attention}.qkv", [f"{attention}.{n}_proj" for n in "qkv"], with_bias=True)
        return rename_prefixes(state, TRANSFORMERS_NAMES)

    def prepare_positions(self, meta: PackMetadata) -> None:
        side = self.config.position_grid_size
        meta.position_lookup = TableLookup.build(meta.grid_thw, (side, side), "bilinear", meta.device)
