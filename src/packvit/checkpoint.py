"""Checkpoints on disk: finding them, reading ``config.json`` and safetensors, and the helpers every
family's checkpoint map is written with.

A checkpoint is a directory holding ``config.json`` and ``model.safetensors`` or, sharded,
``model.safetensors.index.json`` and its shards (the transformers layout), or a hub id fetched into
the local cache when ``huggingface_hub`` is installed. A family maps the checkpoint's tensor names
to its own with one visible function built from ``strip_prefix``, ``rename``, ``fuse_linear`` and
``conv_to_linear``; a checkpoint that does not fit is reported in its own names
(``mismatch_in_checkpoint_names``).
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
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "checkpoint_files",
    "read_state_dict",
    "read_tensor_names",
    "write_checkpoint",
    "strip_prefix",
    "rename",
    "rename_prefixes",
    "fuse_linear",
    "conv_to_linear",
    "linear_to_conv",
    "checkpoint_sources",
    "mismatch_in_checkpoint_names",
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


#: the weights file of a checkpoint directory, and the index of a sharded one (transformers' names)
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(directory: Path) -> dict[Path, set[str] | None]:
    """The safetensors files a checkpoint directory's weights are in, as transformers chooses them:
    ``model.safetensors`` if present, else the shards that ``model.safetensors.index.json`` lists.
    Each file maps to the tensor names the index places in it (``None`` for the single file).
    Other ``*.safetensors`` files beside them are never read."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return {directory / WEIGHTS_FILE: None}
    index_file = directory / WEIGHTS_INDEX_FILE
    if not index_file.is_file():
        found = sorted(file.name for file in directory.glob("*.safetensors"))
        raise ValueError(
            f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} (the files transformers reads)"
            + (f"; it holds {found}: rename the weights file to {WEIGHTS_FILE}, or write an index for the shards"
               if found else "; save the model with safe_serialization")
        )
    weight_map = read_json_object(index_file, "an index of checkpoint shards").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no weight_map (tensor name → shard file); re-save the checkpoint")
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        file = directory / str(shard)
        if Path(str(shard)).name != str(shard) or not file.is_file():
            raise ValueError(f"{index_file} places {name} in {shard!r}, which is not a file of {directory}")
        shards.setdefault(file, set()).add(name)
    return shards


def _read_file(file: Path, expected: set[str] | None, read) -> set[str]:
    """``read(handle, names)`` over one safetensors file; its tensor names, checked against the index's."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
            read(handle, names)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(
            f"{file} cannot be read as safetensors ({type(error).__name__}: {error}); the file is truncated "
            f"or corrupt: re-download or re-save it"
        ) from error
    if expected is not None and not expected <= names:
        raise ValueError(
            f"the checkpoint's index places {sorted(expected - names)[:4]} in {file.name}, which does not hold them; "
            f"the index and the shards disagree: re-save or re-download the checkpoint"
        )
    return names


def _read_checkpoint(directory: Path, read) -> set[str]:
    """Every file of ``checkpoint_files``, with ``read(handle, names)``; a tensor name found in two
    files is refused."""
    seen: dict[str, Path] = {}
    for file, expected in checkpoint_files(directory).items():
        for name in _read_file(file, expected, read):
            if name in seen:
                raise ValueError(
                    f"tensor {name} is in both {seen[name].name} and {file.name}: the checkpoint's shards overlap, "
                    f"so either could be meant; re-save the checkpoint"
                )
            seen[name] = file
    return set(seen)


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory: its ``model.safetensors``, or the shards of its
    ``model.safetensors.index.json`` (``checkpoint_files``)."""
    state: dict[str, torch.Tensor] = {}

    def read(handle, names):
        state.update({name: handle.get_tensor(name) for name in names})

    _read_checkpoint(directory, read)
    return state


def read_tensor_names(directory: Path) -> set[str]:
    """The tensor names of a checkpoint directory's weights (``checkpoint_files``), without reading the tensors."""
    return _read_checkpoint(directory, lambda handle, names: None)


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


# ---------------------------------------------------------------------------------------------
# Mismatches in the checkpoint's own names


def checkpoint_sources(checkpoint_map, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """What ``checkpoint_map`` makes of a checkpoint with tensors ``names``: for each name it gives,
    the checkpoint names it is made of (several where tensors are fused), in order.

    The map runs over one-value stand-ins whose value is the name's number, so fusing (rows
    stacked) keeps the numbers of its sources; zeros it adds (an absent bias part) are nobody's.
    """
    names = sorted(names)
    probe = {name: torch.tensor([float(i + 1)], dtype=torch.float64) for i, name in enumerate(names)}
    return {key: tuple(names[int(tag) - 1] for tag in value.flatten().tolist() if tag > 0)
            for key, value in checkpoint_map(probe).items()}


def _numbered_variants(name: str, old: str, new: str) -> list[str]:
    """``name`` with one of its dot-separated components equal to ``old`` replaced by ``new``."""
    parts = name.split(".")
    return [".".join(parts[:i] + [new] + parts[i + 1:]) for i, part in enumerate(parts) if part == old]


def _guess_sources(key: str, sources: dict[str, tuple[str, ...]]) -> list[str]:
    """Checkpoint names ``key`` would come from, by analogy with a traced name that differs from it
    in one number only (another layer's): that layer's sources with the number replaced."""
    parts = key.split(".")
    for other, other_sources in sources.items():
        other_parts = other.split(".")
        if len(other_parts) != len(parts):
            continue
        differ = [i for i, (a, b) in enumerate(zip(parts, other_parts)) if a != b]
        if len(differ) == 1 and parts[differ[0]].isdigit() and other_parts[differ[0]].isdigit():
            i = differ[0]
            return [variant for source in other_sources for variant in _numbered_variants(source, other_parts[i], parts[i])]
    return []


def mismatch_in_checkpoint_names(checkpoint_map, names: Iterable[str], expected: set[str]) -> tuple[list[str], list[str], list[str]]:
    """Why a checkpoint of tensors ``names`` does not give the ``expected`` parameters through
    ``checkpoint_map``, in the checkpoint's names: ``(missing, unexpected, unplaced)``.

    ``missing``: checkpoint names the model needs and the checkpoint lacks. A parameter with no
    source is traced to its checkpoint names by analogy with another layer's (``_guess_sources``),
    or to its own name, the map confirming the guess; so one absent ``k_proj`` is named as such
    and the present ``q_proj``/``v_proj`` are not called unexpected. ``unexpected``: checkpoint tensors that feed
    no parameter (tensors the map drops on purpose, such as a text tower, are not listed).
    ``unplaced``: the model's own names of parameters no checkpoint name could be found for.
    """
    names = set(names)
    sources = checkpoint_sources(checkpoint_map, names)
    traced = {key: sources[key] for key in sources.keys() & expected}
    needed = {source for key_sources in traced.values() for source in key_sources}
    absent = sorted(expected - sources.keys())
    # another layer's sources renumbered, or the parameter's own name (a part the map leaves as it is)
    guesses = {guess for key in absent for guess in [key, *_guess_sources(key, traced)]} - names
    resolved = checkpoint_sources(checkpoint_map, names | guesses) if guesses else sources
    unplaced = []
    for key in absent:
        if key in resolved:
            needed.update(resolved[key])
        else:
            unplaced.append(key)
    unexpected = {source for key in sources.keys() - expected for source in sources[key]} - needed
    return sorted(needed - names), sorted(unexpected), unplaced
