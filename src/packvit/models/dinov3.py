"""DINOv3 ViT on packed sequences.

Every image becomes one attention segment ``[CLS, register_1 .. register_R, patch tokens]`` of
``1 + R + h*w`` tokens, patches in row-major order. Positions enter through a 2-D RoPE on the
patch tokens only, from each image's own normalised patch centres; the prefix tokens get
identity rows (cos 1, sin 0). There is no absolute position embedding, so any grid works.

Blocks are pre-LayerNorm with LayerScale on both branches; the MLP is ``down(gelu(up x))`` (S, B,
L) or SwiGLU ``down(silu(gate x) * up x)`` (S+, H+, 7B). The final ``norm`` covers every token;
the pooled output is the normalised CLS token, ``prefix_tokens`` are the normalised CLS and
registers.

Training mode: the reference multiplies the RoPE coordinates by a random factor in training mode
(``pos_embed_rescale``) and applies dropout and drop path there. packvit never augments: its
forward is deterministic and identical in ``.train()`` and ``.eval()``, equal to the reference in
``.eval()``. Augmentations for training belong in the caller's data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import conv_to_linear, fuse_linear, rename
from ..layers import EncoderBlock, GatedMlp, Mlp
from ..packing import to_device
from ..positions import RotaryTable, normalized_patch_centres, rope_2d_cos_sin, rope_2d_inv_freq
from .base import PackedVisionModel, PackMetadata
from .config import VisionConfig

__all__ = ["DINOv3Config", "DINOV3_RELEASES", "DINOv3Embeddings", "DINOv3ViTPacking"]


@dataclass(frozen=True)
class DINOv3Config(VisionConfig):
    """The fields of a DINOv3 ViT ``config.json`` that shape the encoder (transformers' names)."""

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    patch_size: int = 16
    hidden_act: str = "gelu"
    num_register_tokens: int = 4
    use_gated_mlp: bool = False
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    model_types = ("dinov3_vit",)

    def check(self) -> None:
        rope_2d_inv_freq(self.head_dim, self.rope_theta)  # raises for a head_dim the 2-D RoPE cannot use

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers."""
        return 1 + self.num_register_tokens

    @property
    def qkv_bias(self) -> bool:
        return self.query_bias or self.key_bias or self.value_bias


def _release(hidden, layers, heads, mlp, gated=False, qv_bias=True) -> DINOv3Config:
    return DINOv3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        hidden_act="silu" if gated else "gelu", use_gated_mlp=gated, query_bias=qv_bias, value_bias=qv_bias,
    )


#: the released ViT architectures (LVD-1689M; L and 7B also SAT-493M), for random-weight models
DINOV3_RELEASES: dict[str, DINOv3Config] = {
    "facebook/dinov3-vits16-pretrain-lvd1689m": _release(384, 12, 6, 1536),
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": _release(384, 12, 6, 1536, gated=True),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": _release(768, 12, 12, 3072),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": _release(1024, 24, 16, 4096),
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": _release(1280, 32, 20, 5120, gated=True),
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": _release(4096, 40, 32, 8192, gated=True, qv_bias=False),
}


class DINOv3Embeddings(nn.Module):
    """Patch embedding (a Linear on (p, p, C)-flattened patches) and the learned prefix tokens."""

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.patch_embeddings = nn.Linear(config.patch_dim, config.hidden_size)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.register_tokens, std=0.02)

    def forward(self, patches: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """``patches [total_patches, p*p*C]`` → the packed sequence ``[S, D]``, prefix tokens included."""
        patch_embeds = self.patch_embeddings(patches)  # [total_patches, D]
        prefix = torch.cat([self.cls_token[0], self.register_tokens[0]]).to(patch_embeds.dtype)  # [P, D]
        return torch.cat([prefix, patch_embeds]).index_select(0, meta.source_index)  # [S, D]


class DINOv3ViTPacking(PackedVisionModel):
    """DINOv3 ViT (every ``facebook/dinov3-vit*16-pretrain-*`` checkpoint) on packed images.

    ``pooler_output [num_items, hidden]``: the normalised CLS; ``prefix_tokens [num_items, 1 + R,
    hidden]``: the normalised CLS and registers; ``last_hidden_state``: the patch tokens.
    """

    family = "dinov3"
    config_class = DINOv3Config
    has_cls_token = True
    config: DINOv3Config

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def build(self, config: DINOv3Config) -> None:
        dim = config.hidden_size

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, eps=config.layer_norm_eps)

        def mlp() -> nn.Module:
            if config.use_gated_mlp:
                return GatedMlp(dim, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
            return Mlp(dim, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)

        self.embeddings = DINOv3Embeddings(config)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, config.num_attention_heads, norm, mlp(), proj_bias=config.proj_bias, layer_scale=True,
                         qkv_bias=(config.query_bias, config.key_bias, config.value_bias))
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = norm()
        self.head = None

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' DINOv3 ViT names → packvit's.

        - ``layer.{i}.`` and ``model.layer.{i}.`` (both spellings occur) → ``blocks.{i}.``;
        - ``attention.{q,k,v}_proj`` → one ``attn.qkv`` (rows q, k, v; the missing k bias, and on
          7B the q/v biases, as zeros when any bias exists: the block keeps those parts at zero,
          without gradient, since RoPE after the projection makes a key bias matter),
          ``attention.o_proj`` → ``attn.proj``;
        - ``layer_scale{1,2}`` → ``ls{1,2}``; ``mlp.up_proj``/``down_proj`` → ``mlp.fc1``/``fc2``;
          SwiGLU ``mlp.gate_proj`` + ``up_proj`` → ``mlp.gate_up`` and ``down_proj`` → ``mlp.down``;
        - the Conv2d patch weight ``[D, C, p, p]`` → a Linear weight ``[D, p*p*C]`` for (p, p, C) patches;
        - ``embeddings.mask_token`` (masked pre-training only) is dropped.
        """
        config = self.config
        state = rename(state, [(r"^model\.layer\.", "layer."), (r"^layer\.(\d+)\.", r"blocks.\1.")])
        state.pop("embeddings.mask_token", None)
        for i in range(config.num_hidden_layers):
            block = f"blocks.{i}"
            state = fuse_linear(state, f"{block}.attn.qkv", [f"{block}.attention.{n}_proj" for n in "qkv"], config.qkv_bias)
            if config.use_gated_mlp:
                state = fuse_linear(state, f"{block}.mlp.gate_up", [f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"],
                                    config.mlp_bias)
        if "embeddings.patch_embeddings.weight" in state:
            state["embeddings.patch_embeddings.weight"] = conv_to_linear(state["embeddings.patch_embeddings.weight"], "ppc")
        mlp_names = [(r"\.mlp\.down_proj\.", ".mlp.down.")] if config.use_gated_mlp else [
            (r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2.")]
        return rename(state, [
            (r"\.attention\.o_proj\.", ".attn.proj."),
            (r"\.layer_scale(\d)\.", r".ls\1."),
            *mlp_names,
            (r"^norm\.", "final_norm."),
        ])

    def prepare_positions(self, meta: PackMetadata) -> None:
        """RoPE table of the whole sequence, shared by all blocks: identity rows for prefix tokens."""
        config, device, dtype = self.config, meta.device, meta.dtype
        coordinates = to_device(normalized_patch_centres(meta.grid_thw), device)  # [total_patches, 2]
        patch_cos, patch_sin = rope_2d_cos_sin(coordinates, config.head_dim, config.rope_theta, dtype)
        identity_cos = torch.ones(config.num_prefix_tokens, config.head_dim, device=device, dtype=dtype)
        identity_sin = torch.zeros(config.num_prefix_tokens, config.head_dim, device=device, dtype=dtype)
        cos = torch.cat([identity_cos, patch_cos]).index_select(0, meta.source_index)  # [S, hd]
        sin = torch.cat([identity_sin, patch_sin]).index_select(0, meta.source_index)  # [S, hd]
        meta.rotary = RotaryTable(cos, sin, "half")

    def pool(self, x: torch.Tensor, meta: PackMetadata, prefix_tokens: torch.Tensor | None) -> torch.Tensor:
        return prefix_tokens[:, 0]
