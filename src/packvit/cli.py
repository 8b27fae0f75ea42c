"""The ``packvit`` command: ``info``, ``align``, ``bench``, ``convert`` and ``embed``.

Bad arguments and inputs end with ``packvit <command>: error: <what is wrong and how to fix it>``
and exit status 2, without a traceback, before any work: the argument checks of
``packvit.arguments`` while the command line is parsed, then each command's own settings check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from . import __version__, align, arguments
from .attention import backend_report, select_backend
from .layers import compiler_runs_on_cuda

__all__ = ["info_lines", "main"]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_lines(head_dims=(64, 72, 128)) -> list[str]:
    """Versions, the device, and each attention backend's availability here (and why not)."""
    lines = [
        f"packvit      {__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"transformers {_version('transformers')} (needed by `packvit align` and the parity tests only)",
        f"flash-attn   {_version('flash-attn')}   flash-attn-3 {_version('flash_attn_3')}   flash-attn-4 {_version('flash-attn-4')}",
        f"timm         {_version('timm')}",
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = torch.device("cuda")
        lines.append(f"device       cuda: {torch.cuda.get_device_name()} (sm{major}{minor})")
        compiled = "yes" if compiler_runs_on_cuda() else "no (torch.compile needs Triton, which is not importable)"
        lines.append(f"compiled layers by default in CUDA inference (SigLIP2: eager): {compiled}")
    else:
        device = torch.device("cpu")
        lines.append("device       cpu (no CUDA device)")
        lines.append("compiled layers by default: no (eager on the CPU; set model.compile_layers = True to compile)")
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in head_dims:
            chosen = select_backend(device, dtype, head_dim, backend="auto")
            lines.append(f"\nattention backends for {device.type} {str(dtype).replace('torch.', '')} head_dim {head_dim} (auto: {chosen})")
            for name, reason in backend_report(device, dtype, head_dim).items():
                lines.append(f"  {name:13s} {'usable' if reason is None else 'no: ' + reason}")
    return lines


def _info(args) -> int:
    print("\n".join(info_lines(tuple(args.head_dim))))
    return 0


def _add_bench_parser(commands, argv) -> None:
    """``packvit bench`` with the flags of the suite ``--suite`` names: each suite has its own (their
    token budgets even count different tokens), so the suite is read from the command line first."""
    from .benchmarks import SUITES, suite

    scan = argparse.ArgumentParser(add_help=False)
    scan.add_argument("--suite", default="inference")
    chosen = scan.parse_known_args(sys.argv[1:] if argv is None else argv)[0].suite
    module = suite(chosen if chosen in SUITES else "inference")
    parser = commands.add_parser("bench", help="speed and memory against the references (docs/benchmarks.md)",
                                 description=module.__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES, default="inference",
                        help="inference (default): forward throughput, memory and latency; training: forward + "
                             "backward; files: packvit embed end to end on JPEG files. Each suite has its own "
                             "flags: `packvit bench --suite NAME --help` lists them")
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="packvit", description="Vision transformers on packed sequences.")
    parser.add_argument("--version", action="version", version=f"packvit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and attention backends usable here")
    info.add_argument("--head_dim", type=arguments.positive_int, nargs="+", default=[64, 72, 128])
    info.set_defaults(handler=_info)

    align_parser = commands.add_parser("align", help="parity of packed models against their references")
    align.add_arguments(align_parser)
    align_parser.set_defaults(handler=align.run)

    _add_bench_parser(commands, argv)

    from . import convert

    convert.add_convert_parser(commands)

    from .embed import cli as embed_cli

    embed_parser = commands.add_parser("embed", help="images, videos and tar shards to embedding shards (resumable, multi-GPU)")
    embed_cli.add_arguments(embed_parser)
    embed_parser.set_defaults(handler=embed_cli.run)

    args = parser.parse_args(argv)
    return arguments.run_command(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
