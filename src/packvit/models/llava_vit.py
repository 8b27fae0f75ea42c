"""OneVision Encoder (LlavaViT): a pre-LN ViT with a 3-D (t, h, w) RoPE, on packed sequences.

``LlavaViTPackingModel`` runs images and videos of any sizes packed into one sequence, patches in
the (C, p, p) layout of the published packing format; each item (a whole video included) is one
attention segment. The forward pass:

1. patch embedding: the bias-free Conv2d of the checkpoint, as a Linear over (C, p, p) patches;
2. ``layernorm_pre``;
3. pre-norm blocks ``x + proj(attention(rope(q), rope(k), v))`` and ``x + fc2(gelu(fc1(x)))``,
   with the 3-D RoPE (``packvit.positions.rope_3d_cos_sin``) over integer (t, row, column)
   positions: from the grid (frame i at t = i), or as given in ``patch_positions`` (the 64-slot
   video timeline of ``packvit.preprocess.llava_vit``);
4. if ``use_head``: ``layernorm_post`` over all tokens, then a multihead attention-pooling head
   (a learned probe, RMSNorm, MLP) giving one vector per item.

Three checkpoint layouts load: the published one (``OneVisionEncoderModel``; packvit's dense
reference ``packvit.harness.llava_vit_reference.LlavaViTModel``), the packing format
(``LlavaViTPackingModel.save_pretrained`` writes it), and the training code's, which
``packvit convert llava-vit --from training`` turns into the packing format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..checkpoint import conv_to_linear, fuse_linear, linear_to_conv, read_tensor_names, rename, rename_prefixes, strip_prefix
from ..layers import AttentionPoolingHead, EncoderBlock, Mlp, RMSNorm
from ..packing import to_device, token_positions, validate_patch_positions
from ..positions import RotaryTable, rope_3d_axis_widths, rope_3d_cos_sin
from .base import PackedVisionModel, PackMetadata
from .config import VisionConfig

__all__ = [
    "LlavaViTConfig",
    "LlavaViTPackingConfig",
    "LLAVA_VIT_SIZES",
    "llava_vit_packing_config",
    "LlavaViTPackingModel",
    "PUBLISHED_PREFIXES",
    "checkpoint_layout",
    "layout_of_keys",
    "map_published_to_packing",
    "map_training_to_published",
    "config_from_training_state",
]

NORM_TYPES = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class LlavaViTConfig(VisionConfig):
    """Configuration of the published OneVision Encoder (``model_type`` ``onevision_encoder``).

    Defaults are ``onevision-encoder-large``: 1024 wide, 24 layers of 16 heads, MLP 4096, patch 14,
    images of 448, RoPE theta 1e4 over a 64-slot timeline, with the attention-pooling head.
    ``attention_dropout`` and ``initializer_range`` are carried for the checkpoint format only:
    packvit applies no dropout.
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    hidden_act: str = "gelu"
    image_size: int = 448
    layer_norm_eps: float = 1e-6
    layer_norm_type: str = "layer_norm"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_temporal_size: int = 64
    use_head: bool = True

    model_types: ClassVar[tuple[str, ...]] = ("onevision_encoder", "llava_vit", "llava_vit_packing")

    def check(self) -> None:
        if self.layer_norm_type not in NORM_TYPES:
            raise ValueError(f"layer_norm_type must be one of {NORM_TYPES}, got {self.layer_norm_type!r}")
        rope_3d_axis_widths(self.head_dim)  # raises for a head_dim the 3-D RoPE cannot split


@dataclass(frozen=True)
class LlavaViTPackingConfig(LlavaViTConfig):
    """Configuration of the packing format (``model_type`` ``llava_vit_packing``): the published
    fields plus ``temporal_patch_size`` and ``spatial_merge_size``, both 1 (a patch is one frame of
    p x p pixels, and no patches are merged)."""

    temporal_patch_size: int = 1
    spatial_merge_size: int = 1

    model_types: ClassVar[tuple[str, ...]] = ("llava_vit_packing", "onevision_encoder", "llava_vit")

    def check(self) -> None:
        super().check()
        for name in ("temporal_patch_size", "spatial_merge_size"):
            if getattr(self, name) != 1:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not supported: the OneVision Encoder embeds one frame per "
                    f"patch and merges no patches; set it to 1"
                )


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


def norm_layer(config: LlavaViTConfig) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class LlavaViTEmbeddings(nn.Module):
    """The bias-free patch embedding over (C, p, p) patches, then ``layernorm_pre``."""

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.layernorm_pre = norm_layer(config)

    def forward(self, patches: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """``patches [S, C*p*p]`` → ``[S, D]``."""
        return self.layernorm_pre(self.patch_embed(patches))


class LlavaViTPackingModel(PackedVisionModel):
    """OneVision Encoder on packed sequences.

    ``model(batch)`` or ``model(hidden_states [S, C*p*p], grid_thw [N, 3], patch_positions=None)``
    → ``PackedVisionOutput`` with ``last_hidden_state [S, D]`` (after ``layernorm_post`` when the
    model has a head), ``pooler_output [N, D]`` (``None`` without the head) and, on request,
    ``hidden_states`` (``num_hidden_layers + 1`` tensors ``[S, D]``, none after ``layernorm_post``).
    ``from_pretrained`` loads the published layout and the packing format alike.
    """

    family = "llava_vit"
    config_class = LlavaViTPackingConfig
    patch_layout = "cpp"
    takes_video = True
    reads_patch_positions = True
    returns_output_by_default = True
    config: LlavaViTPackingConfig

    def build(self, config: LlavaViTPackingConfig) -> None:
        dim = config.hidden_size
        self.embeddings = LlavaViTEmbeddings(config)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, config.num_attention_heads, lambda: norm_layer(config),
                         Mlp(dim, config.intermediate_size, config.hidden_act))
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = norm_layer(config) if config.use_head else None
        self.head = (
            AttentionPoolingHead(dim, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                                 RMSNorm(dim, eps=config.layer_norm_eps))
            if config.use_head else None
        )

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The published layout or the packing format → packvit's names.

        published → packing: ``embeddings.patch_embedding`` → ``patch_embed.proj``, q/k/v stacked into
        ``self_attn.qkv``, ``out_proj`` → ``proj`` (``map_published_to_packing``); packing → packvit:
        the conv weight becomes a Linear over (C, p, p) patches, ``encoder.layers.{i}`` → ``blocks.{i}``
        with ``layer_norm{1,2}`` → ``norm{1,2}`` and ``self_attn`` → ``attn``, ``layernorm_pre`` moves
        into the embeddings and ``layernorm_post`` is the final norm.
        """
        state = strip_prefix(state, PUBLISHED_PREFIXES)
        layout = layout_of_keys(state)
        if layout == "training":
            raise ValueError(
                "the checkpoint holds a training-format state dict (conv1, transformer.layers.*); convert it "
                "first with `packvit convert llava-vit --src DIR --dst OUT --from training`"
            )
        if layout == "published":
            state = map_published_to_packing(state)
        state["patch_embed.proj.weight"] = conv_to_linear(state["patch_embed.proj.weight"], "cpp")
        return rename_prefixes(state, _PACKING_NAMES)

    def export_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The packing format: ``config.json`` of ``model_type`` ``llava_vit_packing`` and the packing names."""
        state = rename_prefixes(self.state_dict(), _PACKING_NAMES, reverse=True)
        config = self.config
        state["patch_embed.proj.weight"] = linear_to_conv(state["patch_embed.proj.weight"], "cpp",
                                                          config.num_channels, config.patch_size)
        return config.to_dict(), state

    def prepare_positions(self, meta: PackMetadata) -> None:
        given = meta.patch_positions
        if given is None:
            positions = to_device(token_positions(meta.grid_thw), meta.device)  # host int64 [S, 3] → device
        else:
            validate_patch_positions(given, meta.total_patches)
            positions = to_device(given, meta.device) if given.device.type == "cpu" else given.to(meta.device)
        cos, sin = rope_3d_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # [S, hd] float32 each
        meta.rotary = RotaryTable(cos, sin, "interleaved")


# =============================================================================================
# Checkpoint layouts and the key mappings between them
#
# published (OneVisionEncoderModel): embeddings.patch_embedding, separate self_attn.{q,k,v,out}_proj,
#   keys optionally prefixed "onevision_encoder." (or "llava_vit.");
# packing: patch_embed.proj, fused self_attn.qkv (rows q|k|v), self_attn.proj;
# training (the original training code): conv1, ln_pre/ln_post, transformer.layers.{i}.{ln_1, ln_2,
#   attn.in_proj (fused q|k|v), attn.out_proj, mlp.0, mlp.2}, head.* as published.

PUBLISHED_PREFIXES = ("onevision_encoder.", "llava_vit.")

#: packing-format name prefixes and packvit's ({} stands for a layer index)
_PACKING_NAMES = [
    ("patch_embed.proj.", "embeddings.patch_embed."),
    ("layernorm_pre.", "embeddings.layernorm_pre."),
    ("encoder.layers.{}.layer_norm{}.", "blocks.{}.norm{}."),
    ("encoder.layers.{}.self_attn.", "blocks.{}.attn."),
    ("encoder.layers.{}.mlp.", "blocks.{}.mlp."),
    ("layernorm_post.", "final_norm."),
]


def _layer_indices(keys, prefix: str) -> list[int]:
    return sorted({int(key[len(prefix):].split(".")[0]) for key in keys if key.startswith(prefix)})


def checkpoint_layout(directory) -> str:
    """``"published"``, ``"packing"`` or ``"training"``, from the tensor names of the safetensors files."""
    return layout_of_keys(read_tensor_names(directory), directory)


def layout_of_keys(keys, source="the checkpoint") -> str:
    keys = set(strip_prefix(dict.fromkeys(keys), PUBLISHED_PREFIXES))
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
    state = {key: value for key, value in strip_prefix(state, PUBLISHED_PREFIXES).items() if not key.startswith("video_rope.")}
    for i in _layer_indices(state, "encoder.layers."):
        attention = f"encoder.layers.{i}.self_attn"
        state = fuse_linear(state, f"{attention}.qkv", [f"{attention}.{n}_proj" for n in "qkv"], with_bias=True)
    return rename(state, [(r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"\.self_attn\.out_proj\.", ".self_attn.proj.")])


def map_training_to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training keys → published keys; the fused ``attn.in_proj`` split into q, k, v (3 equal row blocks)."""
    state = rename(state, [
        (r"^conv1\.", "embeddings.patch_embedding."), (r"^ln_pre\.", "layernorm_pre."), (r"^ln_post\.", "layernorm_post."),
        (r"^transformer\.layers\.(\d+)\.ln_(\d)\.", r"encoder.layers.\1.layer_norm\2."),
        (r"^transformer\.layers\.(\d+)\.mlp\.0\.", r"encoder.layers.\1.mlp.fc1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.2\.", r"encoder.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),
    ])
    for i in _layer_indices(state, "encoder.layers."):
        attention = f"encoder.layers.{i}.self_attn"
        for suffix in ("weight", "bias"):
            q, k, v = state.pop(f"{attention}.in_proj.{suffix}").chunk(3, dim=0)
            state[f"{attention}.q_proj.{suffix}"], state[f"{attention}.k_proj.{suffix}"], state[f"{attention}.v_proj.{suffix}"] = q, k, v
    return state


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
