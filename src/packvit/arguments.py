"""Checks of command-line arguments, one per kind, shared by every ``packvit`` command.

Each is an argparse ``type``: it runs while the command line is parsed, before any work, and a
bad value ends the command with ``packvit <command>: error: argument --flag: <what and how to
fix it>`` and exit status 2. Called from Python they raise ``BadArgument``, a ``ValueError``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

__all__ = ["run_command", "BadArgument", "positive_int", "non_negative_int", "device", "device_or_default", "output_file", "output_folder", "input_folder"]


class BadArgument(argparse.ArgumentTypeError, ValueError):
    """An argument that cannot be used; the message says why and what to pass instead."""


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadArgument(f"{text!r} is not a whole number") from None
    if value < least:
        raise BadArgument(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    return _whole_number(text, 0)


def device(text: str) -> torch.device:
    """A device that this torch can run on here: ``cpu``, ``cuda``, ``cuda:N``, or another type whose
    torch backend reports a device (``mps``)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError):
        raise BadArgument(f"{text!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA device"
            raise BadArgument(f"{text}: this torch ({torch.__version__}) {why}; use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise BadArgument(f"{text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is not None and callable(getattr(backend, "is_available", None)) and backend.is_available():
        return parsed
    raise BadArgument(f"{text}: no {parsed.type} device is available to this torch; use cpu or cuda")


def device_or_default(given: torch.device | None) -> torch.device:
    """The ``--device`` given, else ``cuda`` when a CUDA device is available, else ``cpu``."""
    return given if given is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _writable_folder(folder: Path, what: str) -> None:
    """Raises unless ``folder`` is an existing folder this process may create files in; ``what``
    begins the message (``"out/x.json: its folder"``)."""
    if not folder.exists():
        raise BadArgument(f"{what} {folder} does not exist; create it first or choose another place")
    if not folder.is_dir():
        raise BadArgument(f"{what} {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadArgument(f"{what} {folder} is not writable by this user; choose a folder you can write to")


def output_file(text: str) -> Path:
    """A file to write: an existing writable file (replaced) or a new one in an existing writable folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise BadArgument(f"{path} is a folder; name a file to write")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadArgument(f"{path} is not writable by this user; choose another file")
    _writable_folder(path.absolute().parent, f"{path}: its folder")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: an existing writable folder, or a new one whose parent is one."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadArgument(f"{path} is a file; name a folder to write into")
        _writable_folder(path, "folder")
    else:
        _writable_folder(path.absolute().parent, f"{path}: its parent folder")
    return path


def input_folder(text: str) -> Path:
    """An existing folder to read."""
    path = Path(text).expanduser()
    if not path.exists():
        raise BadArgument(f"{path} does not exist")
    if not path.is_dir():
        raise BadArgument(f"{path} is a file; name the folder that holds the inputs")
    if not os.access(path, os.R_OK | os.X_OK):
        raise BadArgument(f"{path} is not readable by this user")
    return path


def run_command(command: str, handler, args) -> int:
    """``handler(args)``, its exit status; an input or setting that cannot be used, or a missing
    extra, ends as ``packvit COMMAND: error: ...`` on stderr with status 2."""
    try:
        return handler(args)
    except (ValueError, ImportError) as error:
        print(f"packvit {command}: error: {error}", file=sys.stderr)
        return 2
