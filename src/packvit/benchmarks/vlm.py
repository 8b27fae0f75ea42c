"""LFM2-VL's image path with transformers' SigLIP2 tower and with packvit's, same run, same batches.

    packvit bench --suite vlm --out DIR [--items 512] [--repeats 5] [--smoke]

An LFM2-VL with random weights (SigLIP2 so400m NaFlex tower, without its head as LFM2-VL has it; a
2-layer LFM2 language model, which ``get_image_features`` does not run) encodes docs/benchmarks.md's
``mixed`` images in the VLM's own padded batches: 32 images a batch in workload order, each padded
to LFM2-VL's 1024 rows with its mask and ``spatial_shapes``, random-normal pixels. The grids are
``mixed``'s with each side rounded down to an even number (at least 2): LFM2-VL merges 2x2 patches
into one token, its processor makes both sides multiples of 32 pixels, and transformers 5.17's
``get_image_features`` cannot take an odd side.

``vlm.get_image_features(**batch)`` runs on every batch with transformers' tower (bf16, SDPA), then
with packvit's (``use_packed_vision_tower``): images/s (median of ``--repeats`` passes over all
batches after a warm-up pass), the speed-up, the cosine of the image features (the projector's
output, per token and per image mean) against transformers' tower in bf16, and against a float32
run of transformers' tower on the first batch for both; host synchronisations of one tower call and
of one ``get_image_features`` call (CUDA's sync debug mode); peak memory of one batch. Writes
``lfm2_vl_image_features.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from .._optional import require
from ..attention import select_backend
from ..harness.siglip2 import REFERENCE_SIZES
from ..integrations.transformers import padded_inputs, restore_vision_tower, use_packed_vision_tower
from ..packing import PackedBatch
from .common import environment, median_seconds, peak_memory, require_cuda
from .workloads import workload_grids

__all__ = ["even_grids", "lfm2_vl_batches", "build_lfm2_vl", "feature_agreement", "count_synchronisations", "measure",
           "add_arguments", "run", "main"]

#: LFM2-VL's processor pads every image to max(max_image_tokens * 4, (tile_size / 16)²) rows: 1024 at its defaults
LFM2_VL_MAX_NUM_PATCHES = 1024
#: (vision tower, language model) sizes: "full" the so400m tower of LFM2-VL-1.6B; "smoke" tiny, for any device
SIZES = {
    "full": (REFERENCE_SIZES["full"], dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                                          num_attention_heads=16, num_key_value_heads=8, vocab_size=1024),
             2560),
    "smoke": (dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512), 64),
}


def even_grids(num_items: int) -> list[tuple[int, int]]:
    """The ``mixed`` workload's first ``num_items`` (h, w) grids, each side rounded down to an even number (>= 2)."""
    return [(max(2, h // 2 * 2), max(2, w // 2 * 2)) for _, h, w in workload_grids("mixed", "siglip2", num_items)]


def lfm2_vl_batches(grids, batch_size: int, device: torch.device, seed: int = 0,
                    max_num_patches: int = LFM2_VL_MAX_NUM_PATCHES) -> list[dict[str, torch.Tensor]]:
    """Random-normal images of ``grids`` in LFM2-VL's padded batches of ``batch_size``, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(grids), batch_size):
        chunk = grids[start:start + batch_size]
        patches = torch.randn(sum(h * w for h, w in chunk), 768, generator=generator)
        batch = PackedBatch(patches, torch.tensor([(1, h, w) for h, w in chunk]))
        batches.append({key: value.to(device) for key, value in padded_inputs(batch, max_num_patches).items()})
    return batches


def build_lfm2_vl(size: str, device: torch.device, dtype: torch.dtype):
    """An LFM2-VL of ``SIZES[size]`` with random weights, SDPA attention, in eval mode."""
    transformers = require("transformers", "align", "the LFM2-VL benchmark")
    vision, text, projector = SIZES[size]
    config = transformers.Lfm2VlConfig(
        vision_config=dict(model_type="siglip2_vision_model", num_patches=256, vision_use_head=False, **vision),
        text_config=dict(model_type="lfm2", layer_types=["conv", "full_attention"], **text),
        projector_hidden_size=projector, image_token_id=396,
    )
    torch.manual_seed(0)
    with torch.device(device):
        vlm = transformers.Lfm2VlForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return vlm.eval()


def _image_features(vlm, batch: dict) -> list[torch.Tensor]:
    out = vlm.get_image_features(**batch)
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)  # a list of [tokens, D] per image


def feature_agreement(expected: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Cosine of image features, float32: per token (mean, min) and per image mean feature (min)."""
    a, b = torch.cat(expected).float(), torch.cat(got).float()
    tokens = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    images = torch.nn.functional.cosine_similarity(torch.stack([e.float().mean(0) for e in expected]),
                                                   torch.stack([g.float().mean(0) for g in got]), dim=-1)
    return {"token_cosine_mean": tokens.mean().item(), "token_cosine_min": tokens.min().item(),
            "image_mean_cosine_min": images.min().item(), "max_abs_diff": (a - b).abs().max().item()}


def count_synchronisations(fn) -> int | None:
    """Host synchronisations CUDA's sync debug mode reports during ``fn()`` (``None`` off CUDA)."""
    if not torch.cuda.is_available():
        return None
    fn()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _measure(vlm, batches, repeats: int, device) -> dict:
    """Features of every batch, seconds per pass, synchronisations and peak memory of one batch."""
    with torch.inference_mode():
        features = [f for batch in batches for f in _image_features(vlm, batch)]
        seconds = median_seconds(lambda: [_image_features(vlm, batch) for batch in batches], device, repeats)
        tower = vlm.model.vision_tower
        first = batches[0]
        syncs_tower = count_synchronisations(lambda: tower(first["pixel_values"], first["pixel_attention_mask"],
                                                           first["spatial_shapes"]))
        syncs_features = count_synchronisations(lambda: _image_features(vlm, first))
        with peak_memory(device) as memory:
            _image_features(vlm, first)
    return {"features": features, "seconds_per_pass": seconds, "images_per_second": len(features) / seconds,
            "host_syncs_tower_call": syncs_tower, "host_syncs_get_image_features": syncs_features,
            "peak_memory_mib": memory.peak_mib, "peak_above_start_mib": memory.above_start_mib}


def measure(args) -> dict:
    """The benchmark (module docstring); returns the figures written to ``args.out``."""
    transformers = require("transformers", "align", "the LFM2-VL benchmark")
    if not hasattr(transformers, "Lfm2VlForConditionalGeneration"):
        raise ValueError(f"transformers {transformers.__version__} has no LFM2-VL: upgrade it to 4.57 or newer")
    if min(args.items, args.batch_size, args.repeats) < 1:
        raise ValueError("--items, --batch_size and --repeats must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.smoke:
        require_cuda(device, "vlm", "--smoke runs tiny models anywhere")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the float32 reference
    size = "smoke" if args.smoke else "full"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grids = even_grids(args.items)
    batches = lfm2_vl_batches(grids, args.batch_size, device)
    vlm = build_lfm2_vl(size, device, dtype)

    reference = _measure(vlm, batches, args.repeats, device)  # transformers' tower first: nothing of packvit has run
    use_packed_vision_tower(vlm)
    packed = _measure(vlm, batches, args.repeats, device)
    packed_backend = select_backend(device, dtype, vlm.config.vision_config.hidden_size // vlm.config.vision_config.num_attention_heads)
    restore_vision_tower(vlm)
    first = min(args.batch_size, len(grids))  # the images of the first batch
    vlm.float()
    with torch.inference_mode():
        float32 = _image_features(vlm, batches[0])
    results = {
        "workload": {
            "name": "mixed, sides rounded down to even", "items": len(grids), "batch_size": args.batch_size,
            "padded_rows_per_image": LFM2_VL_MAX_NUM_PATCHES, "real_patches": sum(h * w for h, w in grids),
            "image_tokens": sum(h * w // 4 for h, w in grids),
        },
        "model": {"size": size, "tower": SIZES[size][0], "dtype": str(dtype).removeprefix("torch.")},
        "transformers_tower": {k: v for k, v in reference.items() if k != "features"},
        "packvit_tower": {k: v for k, v in packed.items() if k != "features"},
        "speedup": packed["images_per_second"] / reference["images_per_second"],
        "packvit_vs_transformers": feature_agreement(reference["features"], packed["features"]),
        "first_batch_vs_float32_transformers": {
            "transformers": feature_agreement(float32, reference["features"][:first]),
            "packvit": feature_agreement(float32, packed["features"][:first]),
        },
        "environment": {
            **environment(device),
            "transformers_attention": vlm.config.vision_config._attn_implementation, "packvit_attention": packed_backend,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lfm2_vl_image_features.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.environ.get("OUT", "vlm_bench"), help="directory for the JSON figures")
    parser.add_argument("--items", type=int, default=512, help="mixed images (BENCHMARKS.md: 512)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per padded batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (the median is reported)")
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models, any device (a check that it runs)")


def run(args: argparse.Namespace) -> int:
    measure(args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
