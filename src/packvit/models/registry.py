"""Which model family a checkpoint belongs to, read from its ``config.json``.

``FAMILIES`` names the four families; ``family_of(config_dict)`` maps a configuration's
``model_type`` to one of them, and ``model_class(family)`` imports that family's model class.
"""

from __future__ import annotations

import importlib

__all__ = ["FAMILIES", "FAMILY_MODEL_TYPES", "FAMILY_CLASSES", "family_of", "family_config", "model_class", "normalize_family"]

FAMILIES = ("siglip2", "dinov3", "aimv2", "llava_vit")

#: the ``model_type`` values each family loads (every layout it reads: full models and vision towers,
#: OneVision's published and packing formats)
FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "siglip2": ("siglip2", "siglip2_vision_model"),
    "dinov3": ("dinov3_vit",),
    "aimv2": ("aimv2", "aimv2_vision_model"),
    "llava_vit": ("onevision_encoder", "llava_vit", "llava_vit_packing"),
}

#: module and class of each family's model
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "siglip2": ("packvit.models.siglip2", "Siglip2NaflexPacking"),
    "dinov3": ("packvit.models.dinov3", "DINOv3ViTPacking"),
    "aimv2": ("packvit.models.aimv2", "AIMv2Packing"),
    "llava_vit": ("packvit.models.llava_vit", "LlavaViTPackingModel"),
}

#: model types of neighbouring models that packvit does not load, with what to use instead
_NEAR_MISSES = {
    "siglip": "SigLIP (model_type 'siglip', e.g. google/siglip2-*-patch16-224) is the fixed-resolution model with a "
              "convolutional patch embedding; packvit loads the NaFlex checkpoints google/siglip2-*-patch16-naflex",
    "siglip_vision_model": "SigLIP (fixed resolution) is not SigLIP2 NaFlex; load google/siglip2-*-patch16-naflex",
    "dinov3_convnext": "DINOv3 ConvNeXt is not a vision transformer; packvit loads the facebook/dinov3-vit*16-pretrain-* checkpoints",
}


def normalize_family(name: str) -> str:
    """A family name as the user may spell it (``"llava-vit"``, ``"SigLIP2"``) → its canonical name."""
    canonical = name.replace("-", "_").lower()
    if canonical == "onevision":
        canonical = "llava_vit"
    if canonical not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; packvit has {list(FAMILIES)}")
    return canonical


def family_of(config_dict: dict, source: str = "the checkpoint") -> str:
    """The family of a checkpoint's ``config.json`` contents; ``ValueError`` naming what is supported."""
    model_type = config_dict.get("model_type")
    for family, model_types in FAMILY_MODEL_TYPES.items():
        if model_type in model_types:
            return family
    supported = "; ".join(f"{family}: {', '.join(types)}" for family, types in FAMILY_MODEL_TYPES.items())
    hint = f" {_NEAR_MISSES[model_type]}." if model_type in _NEAR_MISSES else ""
    raise ValueError(
        f"{source} has model_type {model_type!r} (architectures {config_dict.get('architectures')}), which no "
        f"packvit family loads.{hint} Supported model types: {supported}."
    )


def model_class(family: str):
    """The model class of a family (imported on first use)."""
    module, name = FAMILY_CLASSES[normalize_family(family)]
    return getattr(importlib.import_module(module), name)


def family_config(config_dict: dict, source: str = "the checkpoint"):
    """``(family, config)`` of a checkpoint's ``config.json`` contents: the family's own frozen
    configuration (``patch_size``, ``hidden_size`` ... and the family's fields)."""
    family = family_of(config_dict, source)
    return family, model_class(family).config_from_dict(config_dict)
