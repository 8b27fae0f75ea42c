"""The ``packvit embed`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import os
import sys

from .decode import DEFAULT_MAX_PIXELS
from .options import EmbedOptions
from .run import embed

__all__ = ["add_arguments", "run", "main"]


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated hidden-state indices such as -1,-2, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``packvit embed``."""
    defaults = EmbedOptions()
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--input", required=True, nargs="+",
                        help="a folder (recursive), a list file (.txt, .csv, .parquet), or .tar shards "
                             "(paths, brace patterns such as 'shards/{000..009}.tar', globs)")
    parser.add_argument("--output", required=True, help="output folder: img_emb/, metadata/, manifest.json")
    resolution = parser.add_argument_group("resolution and packing")
    resolution.add_argument("--fixed", action="store_true",
                            help="the family's published fixed-size processor instead of native resolution")
    resolution.add_argument("--max_num_patches", type=int, default=None,
                            help="patch budget per image at native resolution (default: the family's own)")
    resolution.add_argument("--token_budget", type=int, default=defaults.token_budget, help="patch tokens per pack")
    resolution.add_argument("--num_frames", type=int, default=defaults.num_frames, help="frames sampled per video")
    resolution.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help="images with more pixels are recorded as too_large")
    out = parser.add_argument_group("outputs")
    out.add_argument("--dtype", choices=("float16", "float32"), default=defaults.dtype,
                     help="dtype of the stored embeddings and tokens")
    out.add_argument("--normalize", action="store_true", help="L2-normalise the pooled embeddings")
    out.add_argument("--save_tokens", action="store_true",
                     help="also write patch tokens per item (tokens/tokens_{shard}.safetensors)")
    out.add_argument("--layers", type=_layers, default=(),
                     help="with --save_tokens: hidden states to write instead of last_hidden_state, e.g. -1,-2 "
                          "(0 = embeddings, -1 = last layer before the final norm)")
    out.add_argument("--shard_size", type=int, default=defaults.shard_size,
                     help="inputs per output shard for folders and lists (a tar is one shard)")
    out.add_argument("--path_column", default=None, help="path column of a .csv/.parquet list (default: image_path, path, ...)")
    out.add_argument("--overwrite", action="store_true", help="replace outputs made with other settings")
    run_group = parser.add_argument_group("running")
    run_group.add_argument("--workers", type=int, default=None,
                           help="DataLoader worker processes per GPU (default: the CPU cores per process, less one)")
    run_group.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    run_group.add_argument("--model_dtype", choices=("bfloat16", "float16", "float32"), default=None,
                           help="default: bfloat16 on CUDA, float32 on the CPU")
    run_group.add_argument("--quiet", action="store_true", help="no progress bar: one log line per shard")


def run(args: argparse.Namespace) -> int:
    """Runs ``packvit embed``; 0 when every shard is done (failed inputs included), 1 when some are not,
    2 on a usage error."""
    options = {name: getattr(args, name) for name in EmbedOptions.names()}
    try:
        summary = embed(args.model, args.input, args.output, **options)
    except (ValueError, ImportError) as error:
        print(f"packvit embed: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(summary.lines()), file=sys.stderr if args.quiet else sys.stdout)
    return 1 if summary.missing_shards else 0


def main(argv=None) -> int:
    """``python -m packvit.embed``: the command on its own (also what torchrun ``-m packvit.embed`` runs)."""
    parser = argparse.ArgumentParser(prog="packvit embed", description="Embed images and videos into shards "
                                     "(clip-retrieval layout), resumable, on one or many GPUs.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
