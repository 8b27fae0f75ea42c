"""DINOv3 ViT on packed sequences.

Every image becomes one attention segment ``[CLS, register_1 .. register_R, patch tokens]`` of
``1 + R + h*w`` tokens, patches in row-major order. The segments of a batch are concatenated into
one sequence and attend only within themselves (varlen attention over ``cu_seqlens``). Positions
enter through a 2-D RoPE on the patch tokens only, from each image's own normalised patch
centres; the prefix tokens get identity rows (cos 1, sin 0). There is no absolute position
embedding, so any grid works.

Blocks are pre-LayerNorm with LayerScale on both branches:
``x += lambda1 * o_proj(attention(norm1 x))``, ``x += lambda2 * mlp(norm2 x)``; the MLP is
``down(gelu(up x))`` (S, B, L) or SwiGLU ``down(silu(gate x) * up x)`` (S+, H+, 7B). The final
``norm`` covers every token; the pooled output is the normalised CLS token.

Training mode: the reference multiplies the RoPE coordinates by a random factor in training mode
(``pos_embed_rescale``) and applies dropout and drop path there. packvit never augments: its
forward is deterministic and identical in ``.train()`` and ``.eval()``, equal to the reference in
``.eval()``. Augmentations for training belong in the caller's data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from ..layers import FusedQKVSelfAttention, GatedMlp, Mlp, VarlenContext, fuse_linear, run_layer
from ..packing import item_token_counts, prefix_token_index, to_device, validate_grid_thw, validate_patches
from ..rope import apply_dinov3_rope, dinov3_inv_freq, dinov3_patch_coordinates, dinov3_rope_cos_sin
from .base import PackedVisionModel, PackedVisionOutput

__all__ = ["DINOv3Config", "DINOV3_RELEASES", "DINOv3SequenceLayout", "DINOv3ViTPacking"]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DINOv3Config:
    """The fields of a DINOv3 ViT ``config.json`` that shape the encoder (transformers' names)."""

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 16
    num_channels: int = 3
    num_register_tokens: int = 4
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers."""
        return 1 + self.num_register_tokens

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def qkv_bias(self) -> bool:
        return self.query_bias or self.key_bias or self.value_bias

    @classmethod
    def from_dict(cls, config_dict: dict) -> "DINOv3Config":
        """Reads a transformers ``DINOv3ViTConfig`` dict; ``ValueError`` for any other model."""
        model_type = config_dict.get("model_type")
        if model_type == "dinov3_convnext":
            raise ValueError(
                "this checkpoint is a DINOv3 ConvNeXt (model_type 'dinov3_convnext'), not a vision "
                "transformer; DINOv3ViTPacking loads the facebook/dinov3-vit*16-pretrain-* checkpoints."
            )
        if model_type != "dinov3_vit":
            raise ValueError(
                f"this checkpoint is not a DINOv3 ViT: config.json has model_type {model_type!r}, expected "
                f"'dinov3_vit'; load it with the packvit model of its own family."
            )
        patch_size = config_dict.get("patch_size", cls.patch_size)
        if isinstance(patch_size, (list, tuple)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"DINOv3ViTPacking needs square patches, the checkpoint has patch_size {patch_size}")
            patch_size = patch_size[0]
        values = {f.name: config_dict[f.name] for f in fields(cls) if f.name in config_dict}
        values["patch_size"] = int(patch_size)
        config = cls(**values)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        dinov3_inv_freq(config.head_dim, config.rope_theta)  # raises for a head_dim RoPE cannot use
        return config


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


# ---------------------------------------------------------------------------------------------
# Sequence layout: where every token of the packed sequence comes from (host, once per forward)


@dataclass
class DINOv3SequenceLayout:
    """Host-side index maps of a pack of images, each a segment ``[prefix tokens, patches]``.

    ``source_index [S]``: row of ``cat([prefix table (P rows), patch rows])`` that fills each of
    the ``S = total_patches + num_items * P`` sequence positions (P = 1 + registers);
    ``patch_rows [total_patches]`` and ``prefix_rows [num_items, P]``: sequence positions of the
    patches and of each image's prefix tokens; ``patch_coordinates [total_patches, 2]``: float32
    normalised (y, x) patch centres for RoPE; ``segment_lengths``: ``P + h*w`` per image.
    """

    source_index: torch.Tensor
    patch_rows: torch.Tensor
    prefix_rows: torch.Tensor
    patch_coordinates: torch.Tensor
    segment_lengths: list[int]

    @classmethod
    def from_grid(cls, grid_thw: torch.Tensor, num_prefix_tokens: int) -> "DINOv3SequenceLayout":
        """``grid_thw [num_items, 3]`` (validated, host, t = 1) → the layout of the packed sequence."""
        counts = item_token_counts(grid_thw)
        prefix_rows, patch_rows = prefix_token_index(counts, num_prefix_tokens)
        total_patches, num_items = patch_rows.numel(), len(counts)
        source_index = np.empty(total_patches + num_items * num_prefix_tokens, dtype=np.int64)
        source_index[prefix_rows.numpy().ravel()] = np.tile(np.arange(num_prefix_tokens), num_items)
        source_index[patch_rows.numpy()] = num_prefix_tokens + np.arange(total_patches)
        return cls(
            source_index=torch.from_numpy(source_index),
            patch_rows=patch_rows,
            prefix_rows=prefix_rows,
            patch_coordinates=dinov3_patch_coordinates(grid_thw[:, 1:]),
            segment_lengths=[num_prefix_tokens + n for n in counts],
        )

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(source_index, patch_rows, prefix_rows flattened, patch_coordinates)`` on ``device``.

        The three index maps travel in one non-blocking copy, the coordinates in another.
        """
        index_maps = [self.source_index, self.patch_rows, self.prefix_rows.flatten()]
        joined = torch.from_numpy(np.concatenate([m.numpy().ravel() for m in index_maps]))
        on_device = to_device(joined, device).split([m.numel() for m in index_maps])
        return (*on_device, to_device(self.patch_coordinates, device))


# ---------------------------------------------------------------------------------------------
# Embeddings


class DINOv3Embeddings(nn.Module):
    """Patch embedding (a Linear on (p, p, C)-flattened patches) and the learned prefix tokens."""

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.patch_embeddings = nn.Linear(config.patch_dim, config.hidden_size)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.register_tokens, std=0.02)

    def forward(self, patches: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
        """``patches [total_patches, p*p*C]``, ``source_index [S]`` → the packed sequence ``[S, D]``."""
        patch_embeds = self.patch_embeddings(patches)  # [total_patches, D]
        prefix = torch.cat([self.cls_token[0], self.register_tokens[0]]).to(patch_embeds.dtype)  # [P, D]
        return torch.cat([prefix, patch_embeds]).index_select(0, source_index)  # [S, D]


# ---------------------------------------------------------------------------------------------
# Transformer block


class LayerScale(nn.Module):
    """Per-channel scale ``x * lambda1``."""

    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class DINOv3Layer(nn.Module):
    """Pre-LN block with LayerScale: attention with RoPE, then a GELU or SwiGLU MLP."""

    def __init__(self, config: DINOv3Config):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = FusedQKVSelfAttention(dim, config.num_attention_heads, qkv_bias=config.qkv_bias,
                                               proj_bias=config.proj_bias)
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if config.use_gated_mlp:
            self.mlp = GatedMlp(dim, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        else:
            self.mlp = Mlp(dim, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, context: VarlenContext, rope) -> torch.Tensor:
        """``x [S, D]`` → ``[S, D]``."""
        x = x + self.layer_scale1(self.attention(self.norm1(x), context, rope))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# The packed model


class DINOv3ViTPacking(PackedVisionModel):
    """DINOv3 ViT (every ``facebook/dinov3-vit*16-pretrain-*`` checkpoint) on packed images.

    ``model(patches [total_patches, p*p*C], grid_thw [num_items, 3])`` with patches flattened
    (p, p, C) (``packvit.patchify(..., layout="ppc")``) and t = 1 for every item. Returns the patch
    tokens ``[total_patches, hidden]`` after the final norm, in input order. ``return_dict=True``
    gives a ``PackedVisionOutput`` that adds ``pooler_output [num_items, hidden]`` (normalised CLS),
    ``prefix_tokens [num_items, 1 + registers, hidden]`` (normalised CLS and registers) and, with
    ``output_hidden_states=True``, ``hidden_states``: ``num_hidden_layers + 1`` tensors
    ``[total_patches + num_items * (1 + registers), hidden]`` (the embeddings, then each block's
    output, before the final norm) holding the whole packed sequence, one segment
    ``[CLS, registers, patches]`` per image in input order, as the reference's ``hidden_states``
    hold each image's sequence.

    The forward is the same in training and evaluation mode (no RoPE coordinate augmentation, no
    dropout, no drop path): see the module docstring.
    """

    patch_layout = "ppc"

    @classmethod
    def config_from_dict(cls, config_dict: dict) -> DINOv3Config:
        return DINOv3Config.from_dict(config_dict)

    def build(self, config: DINOv3Config) -> None:
        self.embeddings = DINOv3Embeddings(config)
        self.layer = nn.ModuleList([DINOv3Layer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens at the start of every image's segment."""
        return self.config.num_prefix_tokens

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def sequence_layout(self, patches: torch.Tensor, grid_thw) -> tuple[torch.Tensor, DINOv3SequenceLayout]:
        """Validates the inputs and returns the host grid and the sequence layout."""
        grid_thw = validate_grid_thw(grid_thw)
        if (grid_thw[:, 0] != 1).any():
            raise ValueError(
                f"DINOv3 takes images: every grid_thw row needs t = 1, got t values "
                f"{sorted(set(grid_thw[:, 0].tolist()))}; pass each video frame as its own item (1, h, w)."
            )
        validate_patches(patches, grid_thw, self.config.patch_dim, self.device)
        return grid_thw, DINOv3SequenceLayout.from_grid(grid_thw, self.config.num_prefix_tokens)

    def forward(self, hidden_states: torch.Tensor, grid_thw, *, return_dict: bool = False,
                output_hidden_states: bool = False):
        """``hidden_states [total_patches, p*p*C]`` (patches), ``grid_thw [num_items, 3]`` → see the class docstring."""
        grid_thw, layout = self.sequence_layout(hidden_states, grid_thw)
        device, dtype, config = self.device, self.dtype, self.config
        num_items, num_prefix, hidden = grid_thw.shape[0], config.num_prefix_tokens, config.hidden_size
        source_index, patch_rows, prefix_rows, coordinates = layout.to_device(device)

        x = self.embeddings(hidden_states.to(device=device, dtype=dtype), source_index)  # [S, D]

        # RoPE table of the whole sequence, shared by all layers: identity rows for prefix tokens.
        inv_freq = dinov3_inv_freq(config.head_dim, config.rope_theta, device=device)
        patch_cos, patch_sin = dinov3_rope_cos_sin(coordinates, inv_freq, dtype)  # [total_patches, hd]
        identity_cos = torch.ones(num_prefix, config.head_dim, device=device, dtype=dtype)
        identity_sin = torch.zeros(num_prefix, config.head_dim, device=device, dtype=dtype)
        cos = torch.cat([identity_cos, patch_cos]).index_select(0, source_index)  # [S, hd]
        sin = torch.cat([identity_sin, patch_sin]).index_select(0, source_index)  # [S, hd]

        def rope(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_dinov3_rope(q, k, cos, sin)

        context = VarlenContext.from_lengths(layout.segment_lengths, device, backend=self.attention_backend)
        all_states = [x] if output_hidden_states else None
        for block in self.layer:
            x = run_layer(block, x, context, rope, compiled=self.compile_layers)
            if all_states is not None:
                all_states.append(x)
        x = self.norm(x)

        patch_tokens = x.index_select(0, patch_rows)  # [total_patches, D]
        if not return_dict:
            return patch_tokens
        prefix_tokens = x.index_select(0, prefix_rows).view(num_items, num_prefix, hidden)  # [N, P, D]
        return PackedVisionOutput(
            last_hidden_state=patch_tokens,
            pooler_output=prefix_tokens[:, 0],
            hidden_states=tuple(all_states) if all_states is not None else None,
            prefix_tokens=prefix_tokens,
        )

    # -----------------------------------------------------------------------------------------
    # Weight loading

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' DINOv3 ViT names → packvit names, the only place where they differ.

        - ``layer.{i}.`` and ``model.layer.{i}.`` (both spellings occur) → ``layer.{i}.``;
        - ``attention.{q,k,v}_proj`` → one ``attention.qkv`` (rows q, k, v; the missing k bias,
          and on 7B the q/v biases, as zeros when any bias exists), ``attention.o_proj`` →
          ``attention.proj``;
        - ``mlp.up_proj``/``down_proj`` → ``mlp.fc1``/``fc2``; SwiGLU ``mlp.gate_proj`` + ``up_proj``
          → ``mlp.gate_up`` (rows gate, up) and ``down_proj`` → ``mlp.down``;
        - the Conv2d patch weight ``[D, C, p, p]`` → a Linear weight ``[D, p*p*C]`` for (p, p, C)
          patches;
        - ``embeddings.mask_token`` (masked pre-training only) is dropped.
        """
        config = self.config
        mapped = {}
        for key, value in state.items():
            if key.startswith("model.layer."):
                key = key[len("model."):]
            if key == "embeddings.mask_token":
                continue
            mapped[key] = value
        for i in range(config.num_hidden_layers):
            prefix = f"layer.{i}."
            _fuse(mapped, prefix + "attention.qkv", [prefix + f"attention.{name}_proj" for name in "qkv"], config.qkv_bias)
            _rename(mapped, prefix + "attention.o_proj", prefix + "attention.proj")
            if config.use_gated_mlp:
                _fuse(mapped, prefix + "mlp.gate_up", [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], config.mlp_bias)
                _rename(mapped, prefix + "mlp.down_proj", prefix + "mlp.down")
            else:
                _rename(mapped, prefix + "mlp.up_proj", prefix + "mlp.fc1")
                _rename(mapped, prefix + "mlp.down_proj", prefix + "mlp.fc2")
        conv_key = "embeddings.patch_embeddings.weight"
        if conv_key in mapped and mapped[conv_key].dim() == 4:
            weight = mapped[conv_key]  # [D, C, p, p] → [D, p, p, C] → [D, p*p*C]
            mapped[conv_key] = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
        return mapped


def _rename(state: dict[str, torch.Tensor], old: str, new: str) -> None:
    """Moves ``{old}.weight``/``.bias`` to ``{new}``, where present."""
    for suffix in (".weight", ".bias"):
        if old + suffix in state:
            state[new + suffix] = state.pop(old + suffix)


def _fuse(state: dict[str, torch.Tensor], target: str, sources: list[str], with_bias: bool) -> None:
    """``fuse_linear`` when every source weight is present; otherwise the loader reports what is missing."""
    if all(source + ".weight" in state for source in sources):
        fuse_linear(state, target, sources, with_bias=with_bias)
