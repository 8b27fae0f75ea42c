"""Checkpoints on disk: finding them, reading ``config.json`` and safetensors, and the helpers every
family's checkpoint map is written with.

A checkpoint is a directory holding ``config.json`` and one or more ``*.safetensors`` files (the
transformers layout), or a hub id fetched into the local cache when ``huggingface_hub`` is
installed. A family maps the checkpoint's tensor names to its own with one visible function built
from ``strip_prefix``, ``rename``, ``fuse_linear`` and ``conv_to_linear``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "resolve_checkpoint",
    "read_json_object",
    "read_config_dict",
    "read_state_dict",
    "read_tensor_names",
    "write_checkpoint",
    "strip_prefix",
    "rename",
    "rename_prefixes",
    "fuse_linear",
    "conv_to_linear",
    "linear_to_conv",
]


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def resolve_checkpoint(ckpt: str | os.PathLike, patterns: Sequence[str] = ("*.json", "*.safetensors")) -> Path:
    """A local checkpoint directory, or a hub id whose files matching ``patterns`` (by default the
    JSON files and the safetensors) are fetched into the cache."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"checkpoint {ckpt} is a file; pass the directory that holds config.json and *.safetensors")
    if not _looks_like_hub_id(str(ckpt)):
        raise ValueError(
            f"checkpoint {str(ckpt)!r} does not exist: it is neither a local directory nor a hub id "
            f"(owner/name); check the path"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ValueError(
            f"{str(ckpt)!r} is not a local directory, and hub ids need huggingface_hub (pip install "
            f"'packvit[hub]'); or download the checkpoint and pass its directory"
        ) from error
    try:
        return Path(snapshot_download(str(ckpt), allow_patterns=list(patterns)))
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"checkpoint {str(ckpt)!r} is not a local directory and could not be fetched from the hub "
            f"({type(error).__name__}: {message}); download it first and pass its directory"
        ) from error


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` says what it holds); ``ValueError`` naming the file
    when it is not valid JSON or not an object."""
    try:
        contents = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save or re-download it") from error
    if not isinstance(contents, dict):
        raise ValueError(f"{path} holds a JSON {type(contents).__name__}, not an object of {what}")
    return contents


def read_config_dict(directory: Path) -> dict:
    """The contents of ``directory/config.json``; ``ValueError`` naming the file when it is missing or broken."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} has no config.json; it is not a transformers-style checkpoint directory")
    return read_json_object(config_file, "configuration fields")


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no *.safetensors file; save the model with safe_serialization")
    return files


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files (sharded or single)."""
    from safetensors.torch import load_file

    state = {}
    for file in _safetensors_files(directory):
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(
                f"{file} cannot be read as safetensors ({type(error).__name__}: {error}); the file is truncated "
                f"or corrupt: re-download or re-save it"
            ) from error
    return state


def read_tensor_names(directory: Path) -> set[str]:
    """The tensor names of the checkpoint's safetensors files, without reading the tensors."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in _safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
        except Exception as error:
            raise ValueError(f"{file} cannot be read as safetensors ({type(error).__name__}: {error})") from error
    return names


def write_checkpoint(directory: Path, config_dict: dict, state: dict[str, torch.Tensor]) -> None:
    """``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass a directory to save the checkpoint into")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The pieces of a checkpoint map. Each takes and returns a state dict; none edits its input.


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str], drop_others: bool = False) -> dict[str, torch.Tensor]:
    """Removes the first matching prefix from every key; keys with none of them are kept as they
    are, or dropped with ``drop_others``."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            out[key[len(prefix):]] = value
        elif not drop_others:
            out[key] = value
    return out


def rename(state: dict[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Applies every ``(pattern, replacement)`` regular expression, in order, to every key."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def rename_prefixes(state: dict[str, torch.Tensor], pairs: Iterable[tuple[str, str]], reverse: bool = False) -> dict[str, torch.Tensor]:
    """Renames key prefixes by ``(from, to)`` templates, in which ``{}`` stands for a number (a
    layer index) carried over in order; ``reverse`` maps ``to`` back to ``from``."""
    def rule(source: str, target: str) -> tuple[str, str]:
        pattern = "^" + r"(\d+)".join(re.escape(part) for part in source.split("{}"))
        parts = target.split("{}")
        replacement = parts[0] + "".join(f"\\{i}" + part for i, part in enumerate(parts[1:], start=1))
        return pattern, replacement

    return rename(state, [rule(*((b, a) if reverse else (a, b))) for a, b in pairs])


def fuse_linear(state: dict[str, torch.Tensor], target: str, sources: Sequence[str], with_bias: bool) -> dict[str, torch.Tensor]:
    """``{source}.weight``/``.bias`` entries replaced by one ``{target}`` with rows stacked in order.

    A source with no bias contributes zeros (exact), so a fused projection can carry q and v
    biases with none for k. When a source weight is missing the state is returned unchanged, and
    the loader then names what is missing.
    """
    if not all(f"{source}.weight" in state for source in sources):
        return dict(state)
    state = dict(state)
    weights = [state.pop(f"{source}.weight") for source in sources]
    state[f"{target}.weight"] = torch.cat(weights, dim=0)
    biases = [state.pop(f"{source}.bias", None) for source in sources]
    if with_bias:
        state[f"{target}.bias"] = torch.cat(
            [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for b, w in zip(biases, weights)]
        )
    elif any(b is not None for b in biases):
        raise ValueError(f"checkpoint has biases for {list(sources)} but the configuration says the layer has none")
    return state


def conv_to_linear(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """A Conv2d patch weight ``[D, C, p, p]`` → the Linear weight ``[D, C*p*p]`` for patches flattened
    in ``layout`` (``"ppc"``: (p, p, C); ``"cpp"``: (C, p, p))."""
    if weight.dim() != 4:
        return weight
    if layout == "ppc":
        weight = weight.permute(0, 2, 3, 1)  # [D, C, p, p] → [D, p, p, C]
    return weight.reshape(weight.shape[0], -1).contiguous()


def linear_to_conv(weight: torch.Tensor, layout: str, channels: int, patch_size: int) -> torch.Tensor:
    """Inverse of ``conv_to_linear``: ``[D, C*p*p]`` → ``[D, C, p, p]``."""
    if layout == "ppc":
        return weight.reshape(weight.shape[0], patch_size, patch_size, channels).permute(0, 3, 1, 2).contiguous()
    return weight.reshape(weight.shape[0], channels, patch_size, patch_size).contiguous()
