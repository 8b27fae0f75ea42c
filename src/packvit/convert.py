"""``packvit convert``: checkpoints in other layouts → packvit's packing format, verified before saving.

``packvit convert llava-vit --src DIR --dst DIR [--from published|training]`` reads a OneVision
Encoder checkpoint in the published layout (``OneVisionEncoderModel`` / ``LlavaViTModel``) or the
training layout (``conv1``, ``transformer.layers.*``, fused ``attn.in_proj``), builds the standard
model and the packed model from it, runs both on the same random images and video, and writes the
packing-format checkpoint (``LlavaViTPackingModel.save_pretrained``) only if they agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .arguments import output_folder, positive_int

__all__ = ["convert_llava_vit", "read_training_state", "verify_llava_vit", "add_convert_parser"]

SOURCES = ("published", "training")


def read_training_state(src) -> dict[str, torch.Tensor]:
    """The state dict of a training checkpoint: a ``*.safetensors``/``*.pt``/``*.pth``/``*.bin`` file
    or a directory holding one; a ``state_dict``/``model`` wrapper and a ``module.`` prefix removed."""
    from .checkpoint import read_state_dict

    src = Path(src)
    if src.is_dir() and any(src.glob("*.safetensors")):
        state = read_state_dict(src)
    else:
        files = [src] if src.is_file() else sorted(f for pattern in ("*.pt", "*.pth", "*.bin") for f in src.glob(pattern))
        if len(files) != 1:
            raise ValueError(
                f"{src} must be one checkpoint file or a directory with *.safetensors or exactly one "
                f"*.pt/*.pth/*.bin file; found {[f.name for f in files]}"
            )
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(files[0]))
        else:
            state = torch.load(files[0], map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _verification_items(patch_size: int, channels: int) -> list[torch.Tensor]:
    """Two images and a three-frame video of random-normal pixels, fixed seed."""
    generator = torch.Generator().manual_seed(0)
    grids = [(6, 5), (4, 4), (3, 4, 4)]
    items = []
    for grid in grids:
        t, h, w = (1, *grid) if len(grid) == 2 else grid
        shape = (channels, h * patch_size, w * patch_size) if len(grid) == 2 else (t, channels, h * patch_size, w * patch_size)
        items.append(torch.randn(shape, generator=generator))
    return items


def verify_llava_vit(reference, packed, tolerance: float = 1e-4) -> dict[str, float]:
    """Runs the standard ``reference`` and the ``packed`` model (float32 copies) on random items and
    returns max abs and relative differences of tokens and pooled outputs; raises ``ValueError``
    when a relative difference exceeds ``tolerance``."""
    from .metrics import relative_error
    from .packing import patchify

    reference, packed = reference.float().eval(), packed.float().eval()
    config = packed.config
    items = _verification_items(config.patch_size, config.num_channels)
    with torch.no_grad():
        ref_outputs = [reference(item[None] if item.dim() == 3 else item.transpose(0, 1)[None]) for item in items]
        patches, grid_thw = patchify(items, config.patch_size, layout="cpp")
        out = packed(patches, grid_thw)
    ref_tokens = torch.cat([r.last_hidden_state[0] for r in ref_outputs])
    figures = {
        "tokens_max_abs_diff": (out.last_hidden_state - ref_tokens).abs().max().item(),
        "tokens_relative_error": relative_error(out.last_hidden_state, ref_tokens),
    }
    if config.use_head:
        ref_pooled = torch.cat([r.pooler_output for r in ref_outputs])
        figures["pooled_max_abs_diff"] = (out.pooler_output - ref_pooled).abs().max().item()
        figures["pooled_relative_error"] = relative_error(out.pooler_output, ref_pooled)
    worst = max(value for key, value in figures.items() if key.endswith("relative_error"))
    if not worst <= tolerance:
        raise ValueError(
            f"converted model disagrees with the source checkpoint (relative error {worst:.3g} > {tolerance:g}): "
            f"{figures}; nothing was written"
        )
    return figures


def _check_source(src: Path, source: str) -> None:
    """A clear error for a ``--src`` that does not exist, is of another family or of another layout."""
    from .checkpoint import read_config_dict
    from .models.llava_vit import checkpoint_layout
    from .models.registry import family_of

    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    if (src / "config.json").is_file():
        family = family_of(read_config_dict(src), f"--src {src}")
        if family != "llava_vit":
            raise ValueError(
                f"--src {src} is a {family} checkpoint; `packvit convert llava-vit` converts OneVision Encoder "
                f"checkpoints, and {family} checkpoints load as they are with packvit.from_pretrained"
            )
    if src.is_dir() and any(src.glob("*.safetensors")):
        layout = checkpoint_layout(src)
        if layout == "packing":
            raise ValueError(f"--src {src} is already in the packing format; load it with packvit.from_pretrained")
        if layout != source:
            raise ValueError(f"--src {src} holds the {layout} layout, not the {source} one; pass --from {layout}")


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    try:
        output_folder(str(dst))  # a writable folder, or a new one in a writable folder
    except ValueError as error:
        raise ValueError(f"--dst {error}") from None
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("--dst must differ from --src")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"--dst {dst} is not empty; choose an empty or new directory, or pass --overwrite")


def convert_llava_vit(src, dst, source: str = "published", num_attention_heads: int | None = None,
                      tolerance: float = 1e-4, overwrite: bool = False) -> dict[str, float]:
    """Converts a OneVision Encoder checkpoint to the packing format in ``dst``; returns the
    verification figures. ``source``: ``"published"`` or ``"training"``; ``num_attention_heads``
    is needed for a training checkpoint whose shapes match no named size and that has no config.json."""
    from .checkpoint import read_config_dict, read_state_dict
    from .harness.llava_vit_reference import LlavaViTModel
    from .models.llava_vit import (
        LlavaViTConfig, LlavaViTPackingConfig, LlavaViTPackingModel, config_from_training_state, map_training_to_published,
    )

    src, dst = Path(src), Path(dst)
    if source not in SOURCES:
        raise ValueError(f"--from must be one of {SOURCES}, got {source!r}")
    _check_source(src, source)
    _check_destination(dst, src, overwrite)
    if source == "published":
        reference = LlavaViTModel.from_pretrained(src, dtype=torch.float32)
        packed = LlavaViTPackingModel.from_pretrained(src, device="cpu", dtype=torch.float32)
        save_dtype = next(iter(read_state_dict(src).values())).dtype  # the converted checkpoint keeps the source's dtype
    else:
        state = read_training_state(src)
        overrides = {}
        if (src / "config.json").is_file():
            overrides = {key: value for key, value in read_config_dict(src).items()
                         if key in LlavaViTPackingConfig.__dataclass_fields__}
        if num_attention_heads is not None:
            overrides["num_attention_heads"] = num_attention_heads
        config = config_from_training_state(state, **overrides)
        published = map_training_to_published(state)
        reference = LlavaViTModel(LlavaViTConfig(**{key: value for key, value in config.to_dict().items()
                                                    if key in LlavaViTConfig.__dataclass_fields__}))
        reference.load_state_dict(published, strict=True)
        packed = LlavaViTPackingModel(config, device="cpu", dtype=torch.float32)
        packed._load_mapped_state(packed.map_checkpoint(published), src)
        save_dtype = next(iter(state.values())).dtype
    figures = verify_llava_vit(reference, packed, tolerance)
    packed.to(save_dtype).save_pretrained(dst)
    return figures


def _run_llava_vit(args) -> int:
    figures = convert_llava_vit(args.src, args.dst, args.source, args.num_attention_heads, args.tolerance, args.overwrite)
    print(json.dumps({"converted": str(args.dst), "from": args.source, **figures}, indent=2))
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``convert`` (with the ``llava-vit`` converter) to the ``packvit`` command's subparsers."""
    convert = subparsers.add_parser("convert", help="convert a checkpoint to packvit's packing format")
    families = convert.add_subparsers(dest="family", required=True)
    llava_vit = families.add_parser("llava-vit", aliases=["llava_vit"],
                                    help="OneVision Encoder: published or training layout → LlavaViTPackingModel")
    llava_vit.add_argument("--src", required=True, help="source checkpoint directory (or training checkpoint file)")
    llava_vit.add_argument("--dst", required=True,
                           help="directory to write the packing-format checkpoint to (its parent must exist)")
    llava_vit.add_argument("--from", dest="source", choices=SOURCES, default="published", help="layout of --src")
    llava_vit.add_argument("--num_attention_heads", type=positive_int, default=None,
                           help="head count of a training checkpoint that shapes and config.json cannot tell")
    llava_vit.add_argument("--tolerance", type=float, default=1e-4,
                           help="largest relative error between source and converted model accepted before saving")
    llava_vit.add_argument("--overwrite", action="store_true", help="write into a --dst that is not empty")
    llava_vit.set_defaults(handler=_run_llava_vit)
    return convert
