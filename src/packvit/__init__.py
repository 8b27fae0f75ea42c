"""packvit: vision transformers on packed sequences.

All patches of a batch in one ``[total_patches, patch_dim]`` tensor, a ``grid_thw [num_items, 3]``
describing them, and varlen attention with ``cu_seqlens``: native resolutions, many sizes in one
batch, no padding, no masks.

    model = packvit.from_pretrained("google/siglip2-so400m-patch16-naflex")
    processor = packvit.load_processor(model)
    out = model(processor(images))        # PackedVisionOutput: last_hidden_state, pooler_output, ...
"""

from __future__ import annotations

import importlib

import torch

from .attention import varlen_attention
from .metrics import compute_similarity_metrics
from ._version import __version__
from .packing import PackedBatch, SegmentLayout, patchify, unpatchify

__all__ = [
    "__version__",
    "from_pretrained",
    "load_processor",
    "varlen_attention",
    "compute_similarity_metrics",
    "PackedBatch",
    "SegmentLayout",
    "patchify",
    "unpatchify",
    "convert_to_patches",
    "image_to_packing_input",
    "batch_images_to_packing_input",
    "register_timm_models",
    "PackedVisionOutput",
    "Siglip2NaflexPacking",
    "DINOv3ViTPacking",
    "AIMv2Packing",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "LlavaViTModel",
]

# Names that load lazily: each family imports only what it needs, when first used.
_LAZY = {
    "PackedVisionOutput": "packvit.models.base",
    "Siglip2NaflexPacking": "packvit.models.siglip2",
    "DINOv3ViTPacking": "packvit.models.dinov3",
    "AIMv2Packing": "packvit.models.aimv2",
    "LlavaViTPackingConfig": "packvit.models.llava_vit",
    "LlavaViTPackingModel": "packvit.models.llava_vit",
    "LlavaViTModel": "packvit.harness.llava_vit_reference",
    "load_processor": "packvit.preprocess",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packvit' has no attribute {name!r}")


def from_pretrained(ckpt, *, device=None, dtype=None, **config_overrides):
    """The packed model of a checkpoint directory or hub id, its family read from ``config.json``.

    bf16 on CUDA and float32 on the CPU unless ``dtype`` says otherwise (``"fp8"``: the blocks'
    projections in e4m3, see ``packvit.fp8``); ``config_overrides`` replace configuration fields
    (the weights must then fit them), and ``interpolate_pos_encoding``, ``torch_dtype`` and
    ``device_map`` go to the model's ``from_pretrained``.
    """
    from .checkpoint import read_config_dict, resolve_checkpoint
    from .models.registry import family_of, model_class

    directory = resolve_checkpoint(ckpt)
    family = family_of(read_config_dict(directory), str(directory / "config.json"))
    return model_class(family).from_pretrained(directory, device=device, dtype=dtype, **config_overrides)


def register_timm_models() -> list[str]:
    """Registers ``hf_llava_vit_packing_{small,base,large,huge,giant}_ln`` with timm; returns the names."""
    from .integrations.timm import register

    return register()


def convert_to_patches(pixel_values, patch_size: int):
    """``[B, C, H, W]`` → ``(patches [B*h*w, p*p*C], grid_thw [B, 3])`` in the (p, p, C) layout."""
    return patchify(pixel_values, patch_size, layout="ppc")


def image_to_packing_input(image, patch_size: int, layout: str = "ppc"):
    """One image ``[C, H, W]`` (or ``[1, C, H, W]``) → ``(patches, grid_thw [1, 3])``."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"image_to_packing_input takes one image, got a batch of {image.shape[0]}; use batch_images_to_packing_input")
        image = image[0]
    return patchify([image], patch_size, layout=layout)


def batch_images_to_packing_input(images, patch_size: int, layout: str = "ppc"):
    """Images of any sizes (a list of ``[C, H, W]``, or a ``[B, C, H, W]`` batch) → one pack."""
    return patchify(images if isinstance(images, torch.Tensor) else list(images), patch_size, layout=layout)

