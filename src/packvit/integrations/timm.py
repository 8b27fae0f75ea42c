"""timm names for the OneVision Encoder packing models: ``hf_llava_vit_packing_{size}_ln``.

Importing this module registers the five names with timm's registry (``register()`` does the same
explicitly), after which ``timm.create_model("hf_llava_vit_packing_large_ln")`` builds a random
``LlavaViTPackingModel`` of that size. ``import packvit`` alone never imports timm.
"""

from __future__ import annotations

from ..models.llava_vit import LlavaViTPackingModel, llava_vit_packing_config

__all__ = [
    "register",
    "hf_llava_vit_packing_small_ln",
    "hf_llava_vit_packing_base_ln",
    "hf_llava_vit_packing_large_ln",
    "hf_llava_vit_packing_huge_ln",
    "hf_llava_vit_packing_giant_ln",
]

#: timm's own keyword arguments, which packvit's models do not take
_TIMM_OPTIONS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_model(size: str, pretrained: bool, kwargs: dict) -> LlavaViTPackingModel:
    if pretrained:
        raise ValueError(
            f"hf_llava_vit_packing_{size}_ln has no timm weights; load a checkpoint with "
            f"packvit.from_pretrained(directory or hub id)"
        )
    options = {key: value for key, value in kwargs.items() if key not in _TIMM_OPTIONS}
    model_options = {key: options.pop(key) for key in ("device", "dtype") if key in options}
    return LlavaViTPackingModel(llava_vit_packing_config(size, **options), **model_options)


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


ENTRYPOINTS = (
    hf_llava_vit_packing_small_ln,
    hf_llava_vit_packing_base_ln,
    hf_llava_vit_packing_large_ln,
    hf_llava_vit_packing_huge_ln,
    hf_llava_vit_packing_giant_ln,
)


def register() -> list[str]:
    """Registers the five names with timm's ``register_model`` (once); returns the names."""
    from timm.models import is_model, register_model

    for entrypoint in ENTRYPOINTS:
        if not is_model(entrypoint.__name__):
            register_model(entrypoint)
    return [entrypoint.__name__ for entrypoint in ENTRYPOINTS]


register()
