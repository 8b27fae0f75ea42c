"""Where the fp8 mode's error comes from: one family's outputs in bf16, in fp8, and in fp8 with the
attention projections (``qkv``, ``proj``) kept in bf16, each against the float32 model.

    PYTHONPATH=src python scripts/fp8_error_budget.py --family siglip2 --size full --items 6

Runs on the CPU (PyTorch's CPU ``_scaled_mm`` computes e4m3 products exactly to the format, so
the figures are the format's error, not a kernel's) on a random checkpoint of the size asked for
and the first ``--items`` items of the ``mixed`` workload. Prints one JSON line per variant: mean
and least token cosine, mean pooled cosine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from packvit.benchmarks.workloads import workload_grids
from packvit.harness import FAMILIES, get_adapter

CPU = torch.device("cpu")


def cosines(outputs, expected) -> dict:
    """Token and pooled cosine of ``outputs`` against ``expected`` (lists of ``ItemOutput``)."""
    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)

    tokens = torch.cat([cosine(o.tokens, e.tokens) for o, e in zip(outputs, expected)])
    pooled = [cosine(o.pooled, e.pooled) for o, e in zip(outputs, expected) if e.pooled is not None]
    return {"token_cosine_mean": float(tokens.mean()), "token_cosine_min": float(tokens.min()),
            "pooled_cosine_mean": float(torch.stack(pooled).mean()) if pooled else None}


def keep_attention_in_bf16(fp8_model: torch.nn.Module, bf16_model: torch.nn.Module) -> None:
    """The fp8 model's attention projections replaced by the bf16 model's, block by block."""
    for fp8_block, bf16_block in zip(fp8_model.blocks, bf16_model.blocks):
        fp8_block.attn.qkv, fp8_block.attn.proj = bf16_block.attn.qkv, bf16_block.attn.proj


def error_budget(family: str, size: str, num_items: int, checkpoint_root: Path) -> list[dict]:
    adapter = get_adapter(family)
    checkpoint = adapter.cached_random_checkpoint(checkpoint_root, size=size)
    anchor = adapter.load_packed(checkpoint, CPU, torch.float32)
    items = adapter.random_items(workload_grids("mixed", family)[:num_items], anchor.patch_size,
                                 torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = adapter.run_packed(anchor, items)
    del anchor
    bf16_items = [item.bfloat16() for item in items]
    bf16 = adapter.load_packed(checkpoint, CPU, torch.bfloat16)
    fp8 = adapter.load_packed(checkpoint, CPU, "fp8")
    rows = []
    with torch.inference_mode():
        rows.append({"variant": "bf16", **cosines(adapter.run_packed(bf16, bf16_items), expected)})
        rows.append({"variant": "fp8", **cosines(adapter.run_packed(fp8, bf16_items), expected)})
        keep_attention_in_bf16(fp8, bf16)
        rows.append({"variant": "fp8, attention projections in bf16",
                     **cosines(adapter.run_packed(fp8, bf16_items), expected)})
    return [{"family": family, "size": size, "items": num_items, **row} for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--items", type=int, default=6, help="the first N items of the mixed workload")
    parser.add_argument("--ckpt_dir", type=Path, help="where the random checkpoint is written and reused "
                                                      "(default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        for row in error_budget(args.family, args.size, args.items, args.ckpt_dir or Path(temporary)):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
