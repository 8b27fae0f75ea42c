"""packvit: vision transformers on packed sequences.

All patches of a batch in one ``[total_patches, patch_dim]`` tensor, a ``grid_thw [num_items, 3]``
describing them, and varlen attention with ``cu_seqlens``: native resolutions, many sizes in one
batch, no padding, no masks.
"""

from __future__ import annotations

import importlib
import importlib.util

from .attention import varlen_attention
from .metrics import compute_similarity_metrics
from .packing import PackedBatch, SegmentLayout, patchify, unpatchify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "varlen_attention",
    "compute_similarity_metrics",
    "PackedBatch",
    "SegmentLayout",
    "patchify",
    "unpatchify",
    "convert_to_patches",
    "image_to_packing_input",
    "batch_images_to_packing_input",
    "Siglip2NaflexPacking",
    "DINOv3ViTPacking",
    "AIMv2Packing",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "LlavaViTModel",
]

# Models load lazily: each family imports only what it needs, when first used.
_LAZY = {
    "Siglip2NaflexPacking": "packvit.models.siglip2",
    "DINOv3ViTPacking": "packvit.models.dinov3",
    "AIMv2Packing": "packvit.models.aimv2",
    "LlavaViTPackingConfig": "packvit.models.llava_vit",
    "LlavaViTPackingModel": "packvit.models.llava_vit",
    "LlavaViTModel": "packvit.models.llava_vit",
}


def _register_timm_models() -> None:
    """Makes ``timm.create_model("hf_llava_vit_packing_*_ln")`` work when timm is installed."""
    if importlib.util.find_spec("timm") is None:
        return
    try:
        import timm  # noqa: F401  (timm needs torchvision; without it there is nothing to register into)
    except ImportError:
        return
    from .models.llava_vit import register_timm_models

    register_timm_models()


_register_timm_models()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packvit' has no attribute {name!r}")


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
    return patchify(images if isinstance(images, __import__("torch").Tensor) else list(images), patch_size, layout=layout)
