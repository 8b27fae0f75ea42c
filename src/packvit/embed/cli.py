"""The ``packvit embed`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import os
import re
import sys

from .options import AUTO_CPU_ROUTE_WORKERS, DECODE_CHOICES, OUTPUT_DTYPES, WORKERS_RULE, EmbedOptions
from .run import embed

__all__ = ["add_arguments", "run", "main"]


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated hidden-state indices such as -1,-2, got {text!r}")


#: what argparse takes for a negative number rather than a flag: also comma-separated lists such as
#: "-1,-2", so that ``--layers -1,-2`` parses as the help writes it
_NEGATIVE_NUMBERS = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(,\s*-?\d+)+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``packvit embed``."""
    parser._negative_number_matcher = _NEGATIVE_NUMBERS
    defaults = EmbedOptions()
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (required)")
    parser.add_argument("--input", required=True, nargs="+",
                        help="a folder (recursive; its images and videos), a list file (.txt, .csv, .parquet), or .tar "
                             "shards (paths, brace patterns such as 'shards/{000..009}.tar', globs) (required)")
    parser.add_argument("--output", required=True,
                        help="output folder: img_emb/, metadata/, manifest.json; made if missing, in an existing parent "
                             "folder (required)")
    resolution = parser.add_argument_group("resolution and packing")
    resolution.add_argument("--fixed", action="store_true",
                            help="the family's published fixed-size processor (default: native resolution, aspect kept)")
    resolution.add_argument("--max_num_patches", type=int, default=None,
                            help="patch cap per image at native resolution (default: the family's own: SigLIP2 256, "
                                 "DINOv3 1024, OneVision 1024, AIMv2 native none)")
    resolution.add_argument("--token_budget", type=int, default=defaults.token_budget,
                            help="patch tokens per pack (default: %(default)s)")
    resolution.add_argument("--num_frames", type=int, default=defaults.num_frames,
                            help="frames sampled per video (default: %(default)s)")
    resolution.add_argument("--max_pixels", type=int, default=defaults.max_pixels,
                            help="images with more pixels are recorded as too_large (default: %(default)s, Pillow's limit)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--decode", choices=DECODE_CHOICES, default=defaults.decode,
                          help="where JPEGs are decoded: gpu (nvJPEG through torchvision, in batches, then resized on the "
                               "GPU; other files on the CPU), cpu (the DataLoader workers), auto: the GPU where CUDA, "
                               "torchvision with nvJPEG and the processor's device path are there and the run has fewer "
                               f"than {AUTO_CPU_ROUTE_WORKERS} workers per process, else the CPU; recorded in the manifest "
                               "(default: %(default)s)")
    decoding.add_argument("--jpeg_draft", type=float, default=defaults.jpeg_draft, metavar="K",
                          help="decode a JPEG far larger than its resize target at a reduced scale (1/2, 1/4, 1/8 per "
                               "side) keeping at least K times the target per side: faster, slightly other pixels; CPU "
                               "decoding only; recorded in the manifest (default: off, JPEGs decoded in full)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--dtype", choices=OUTPUT_DTYPES, default=defaults.dtype,
                     help="dtype of the stored embeddings and tokens (default: %(default)s)")
    out.add_argument("--normalize", dest="normalize", action="store_true",
                     help="L2-normalise the pooled embeddings, as retrieval indexes expect (default)")
    out.add_argument("--no-normalize", dest="normalize", action="store_false",
                     help="store the pooled embeddings as the model gives them (default: normalised)")
    out.add_argument("--save_tokens", action="store_true",
                     help="also write patch tokens per item, tokens/tokens_{shard}.safetensors (default: off)")
    out.add_argument("--layers", type=_layers, default=(),
                     help="with --save_tokens: hidden states to write instead of last_hidden_state, e.g. -1,-2 "
                          "(0 = embeddings, -1 = last layer before the final norm) (default: last_hidden_state)")
    out.add_argument("--shard_size", type=int, default=defaults.shard_size,
                     help="inputs per output shard for folders and lists; a tar is one shard (default: %(default)s)")
    out.add_argument("--path_column", default=None,
                     help="path column of a .csv/.parquet list (default: the first of image_path, path, filepath, file, "
                          "filename)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace outputs made with other settings (default: off; a rerun with the same settings "
                          "continues the folder)")
    run_group = parser.add_argument_group("running")
    run_group.add_argument("--workers", type=int, default=None,
                           help=f"DataLoader worker processes per process; 0 decodes in the main process (default: "
                                f"{WORKERS_RULE})")
    run_group.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    run_group.add_argument("--model_dtype", choices=("bfloat16", "float16", "float32"), default=None,
                           help="default: bfloat16 on CUDA, float32 on the CPU")
    run_group.add_argument("--batch_invariant", action="store_true",
                           help="batch-invariant model: an input's embedding is the same bytes whatever it is packed "
                                "with, so any number of processes or workers writes the same files (also on with "
                                "PACKVIT_BATCH_INVARIANT=1; docs/batch_invariance.md) (default: off)")
    run_group.add_argument("--quiet", action="store_true",
                           help="one log line per shard instead of the progress bar (default: a progress bar)")
    parser.set_defaults(normalize=defaults.normalize)


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
