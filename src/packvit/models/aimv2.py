"""AIMv2 vision encoder on packed sequences (transformers' ``Aimv2VisionModel``).

Apple's AIMv2: a pre-RMSNorm ViT with SwiGLU MLPs, no biases, no CLS token, patch size 14.

    x   = RMSNorm(Linear(patches)) + position embedding            # per image, [h*w, D]
    x   = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))   # every block, varlen
    out = RMSNorm(x)                                               # last_hidden_state, every token
    pooled_i = output_proj(attention of head.cls_token over image i)   # checkpoints with a head (-lit)

Position embeddings come in two kinds:

- native checkpoints (``is_native``): a 2-D sin-cos table per image grid
  (``packvit.positions.sincos_2d``), computed in float64 and cast to the activation dtype, as in
  the reference;
- fixed-size checkpoints (224/336/448): a learned ``(S*S, D)`` table for one ``S x S`` grid. Any
  other grid raises ``ValueError``; the model attribute ``interpolate_pos_encoding = True`` instead
  resizes the table (antialiased bicubic, float32, as timm's ``resample_abs_pos_embed``), beyond the
  reference.

Input patches are flattened (p, p, C); the checkpoint's Conv2d patch embedding becomes a Linear at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import conv_to_linear, fuse_linear, rename, strip_prefix
from ..layers import EncoderBlock, GatedMlp, ProbePoolingHead, RMSNorm
from ..positions import TableLookup, sincos_2d
from .base import PackedVisionModel, PackMetadata
from .config import VisionConfig

__all__ = ["AIMv2Config", "AIMv2Embeddings", "AIMv2Packing"]


@dataclass(frozen=True)
class AIMv2Config(VisionConfig):
    """The vision tower's configuration; field names and defaults follow ``Aimv2VisionConfig``."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    patch_size: int = 14
    hidden_act: str = "silu"
    image_size: int = 224
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    use_head: bool = True
    is_native: bool = False

    model_types = ("aimv2_vision_model", "aimv2")
    composite_types = ("aimv2",)

    def check(self) -> None:
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"AIMv2 uses a SwiGLU MLP with silu, the configuration asks for {self.hidden_act!r}")
        if self.is_native and self.hidden_size % 4:
            raise ValueError(f"the native sin-cos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")

    @property
    def learned_grid_side(self) -> int:
        """Side, in patches, of the learned position table (fixed-size checkpoints)."""
        return self.image_size // self.patch_size


#: the parts of an ``Aimv2Model`` checkpoint beside its vision tower
_CLIP_PARTS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _check_position_table(config: AIMv2Config, has_table: bool) -> None:
    """``ValueError`` naming ``is_native`` when the checkpoint's position table and config.json disagree."""
    if not config.is_native and not has_table:
        raise ValueError(
            "config.json says is_native false (a learned position table for one image size) but the checkpoint "
            "has no table: missing ['embeddings.position_embedding.weight']. It is a native checkpoint (sin-cos "
            "positions for any grid): set is_native true in config.json"
        )
    if config.is_native and has_table:
        raise ValueError(
            "config.json says is_native true (sin-cos positions) but the checkpoint holds a learned position table, "
            "unexpected ['embeddings.position_embedding.weight']: it is a fixed-size checkpoint; set is_native false "
            "and image_size to the size it was trained at in config.json"
        )


class AIMv2Embeddings(nn.Module):
    """Patch projection (Linear over (p, p, C) patches), RMSNorm, position embedding."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.is_native:
            self.position_embedding = nn.Embedding(config.learned_grid_side**2, config.hidden_size)

    def forward(self, patches: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """``patches [S, p*p*C]`` → ``[S, D]``."""
        x = self.rms_norm(self.patch_embed(patches))
        if meta.position_embeddings is not None:  # native: the sin-cos table of the pack
            return x + meta.position_embeddings
        return x + meta.position_lookup(self.position_embedding.weight)


class AIMv2Packing(PackedVisionModel):
    """AIMv2 vision tower on packed patches.

    ``AIMv2Packing(config)`` builds random weights from an ``AIMv2Config``; ``from_pretrained``
    loads an ``Aimv2VisionModel`` checkpoint or the vision tower of an ``Aimv2Model`` one (-lit,
    with its pooling head). ``pooler_output``: the attention-pooling head's vector per image where
    the configuration has a head (``use_head``), else ``None``.
    """

    family = "aimv2"
    config_class = AIMv2Config
    config: AIMv2Config

    def build(self, config: AIMv2Config) -> None:
        dim = config.hidden_size

        def norm() -> nn.Module:
            return RMSNorm(dim, config.rms_norm_eps)

        self.embeddings = AIMv2Embeddings(config)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, config.num_attention_heads, norm,
                         GatedMlp(dim, config.intermediate_size, "silu", bias=config.mlp_bias),
                         qkv_bias=config.qkv_bias, proj_bias=config.qkv_bias)
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = norm()
        self.head = ProbePoolingHead(dim, config.num_attention_heads, config.qkv_bias) if config.use_head else None

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' AIMv2 names → packvit's.

        The vision tower of an ``Aimv2Model`` lives under ``vision_model.`` (its text tower, the
        projections and the logit scale are dropped; any other tensor is kept, to be reported). The
        Conv2d patch embedding ``[D, C, p, p]`` becomes a Linear over (p, p, C) patches; q/k/v fuse
        into ``attn.qkv`` and ``out_proj`` becomes ``attn.proj``; gate/up fuse into ``mlp.gate_up``
        and ``down_proj`` becomes ``mlp.down``. A learned position table where ``is_native`` says
        there is none, or none where it says there is one, is an error naming ``is_native``.
        """
        config = self.config
        if "vision_model.embeddings.patch_embed.weight" in state:
            state = {key: value for key, value in state.items() if not key.startswith(_CLIP_PARTS)}
            state = strip_prefix(state, ("vision_model.",))
        _check_position_table(config, "embeddings.position_embedding.weight" in state)
        state = rename(state, [(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.")])
        for i in range(config.num_hidden_layers):
            block = f"blocks.{i}"
            state = fuse_linear(state, f"{block}.attn.qkv", [f"{block}.attention.{n}_proj" for n in "qkv"], config.qkv_bias)
            state = fuse_linear(state, f"{block}.mlp.gate_up", [f"{block}.ffn.gate_proj", f"{block}.ffn.up_proj"], config.mlp_bias)
        if "embeddings.patch_embed.weight" in state:
            state["embeddings.patch_embed.weight"] = conv_to_linear(state["embeddings.patch_embed.weight"], "ppc")
        return rename(state, [
            (r"\.attention\.out_proj\.", ".attn.proj."),
            (r"\.ffn\.down_proj\.", ".mlp.down."),
            (r"\.rms_norm(\d)\.", r".norm\1."),
            (r"^rms_norm\.", "final_norm."),
        ])

    def placeholder_grid(self) -> torch.Tensor:
        """One patch, or for a fixed-size checkpoint the one grid its learned table serves."""
        side = 1 if self.config.is_native else self.config.learned_grid_side
        return torch.tensor([[1, side, side]])

    def prepare_positions(self, meta: PackMetadata) -> None:
        config = self.config
        if config.is_native:
            meta.position_embeddings = sincos_2d(meta.grid_thw, config.hidden_size, meta.dtype, meta.device)
            return
        side = config.learned_grid_side
        grids = sorted({(h, w) for _, h, w in meta.grid_thw.tolist()})
        foreign = [grid for grid in grids if grid != (side, side)]
        if foreign and not meta.interpolate_pos_encoding:
            pixels = side * config.patch_size
            raise ValueError(
                f"this AIMv2 checkpoint has a learned position table for a {side}x{side} patch grid ({pixels}px "
                f"images) but the batch has grids {foreign[:4]}; resize images to {pixels}x{pixels} (its processor, "
                f"packvit.load_processor, does), or set model.interpolate_pos_encoding = True (from_pretrained(..., "
                f"interpolate_pos_encoding=True)) to resize the table (beyond the reference)"
            )
        meta.position_lookup = TableLookup.build(meta.grid_thw, (side, side), "bicubic", meta.device)
