"""What every packed model shares: checkpoint resolution and loading, the output type, defaults.

A model family subclasses ``PackedVisionModel`` and supplies three things: how to read its
configuration from a checkpoint's ``config.json`` (rejecting other families), how to build its
modules from that configuration, and one visible function mapping checkpoint keys to its own
parameter names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PackedVisionOutput",
    "PackedVisionModel",
    "resolve_checkpoint",
    "read_config_dict",
    "read_state_dict",
    "default_device",
    "default_dtype",
    "strip_prefix",
]


@dataclass
class PackedVisionOutput:
    """Outputs of a packed model.

    ``last_hidden_state [total_tokens, hidden]`` (patch tokens, in input order);
    ``pooler_output [num_items, hidden]`` or ``None``; ``hidden_states``, on request, a tuple of
    ``[total_sequence, hidden]`` tensors with the meaning the reference gives them;
    ``prefix_tokens [num_items, num_prefix, hidden]`` for models with CLS/register tokens.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    prefix_tokens: torch.Tensor | None = None


def resolve_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched (config and safetensors only) into the cache."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"checkpoint {ckpt} is a file; pass the directory that holds config.json and *.safetensors")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ckpt), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:
        raise ValueError(
            f"checkpoint {ckpt!r} is neither a local directory nor a reachable hub id ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); download it first and pass its directory"
        ) from error


def read_config_dict(directory: Path) -> dict:
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} has no config.json; it is not a transformers-style checkpoint")
    return json.loads(config_file.read_text())


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files (sharded or single)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no *.safetensors file; save the model with safe_serialization")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Removes the first matching prefix from every key; keys with none of them are dropped."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out[key[len(prefix):]] = value
                break
    return out


def default_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, dtype=None) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere, unless asked otherwise."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'float32'")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class PackedVisionModel(nn.Module):
    """Base of the packed models: ``Model(config)`` builds random weights, ``Model(ckpt=...)`` loads.

    Subclasses define ``config_from_dict(config_dict)`` (a classmethod that raises ``ValueError``
    for a checkpoint of another family), ``build(config)`` and ``map_checkpoint(state)``.
    """

    def __init__(self, config=None, *, ckpt=None, device=None, dtype=None):
        super().__init__()
        if (config is None) == (ckpt is None):
            raise ValueError("pass a configuration to build random weights, or ckpt= to load a checkpoint, not both")
        directory = None
        if ckpt is not None:
            directory = resolve_checkpoint(ckpt)
            config = self.config_from_dict(read_config_dict(directory))
        self.config = config
        #: attention backend name for every varlen call of this model (None: automatic)
        self.attention_backend: str | None = None
        #: run each encoder layer through torch.compile: True, False, or None for automatic
        #: (compiled for CUDA inference; see packvit.layers.layers_compiled)
        self.compile_layers: bool | None = None
        state = None
        if directory is not None:
            try:
                state = self.map_checkpoint(read_state_dict(directory))
            except KeyError as error:
                raise ValueError(
                    f"checkpoint {ckpt} has no tensor {error.args[0]!r}, which {type(self).__name__} needs; "
                    f"the checkpoint is incomplete or of another variant (check its config.json against its weights)"
                ) from error
        if state is None:
            self.build(config)
        else:
            with torch.device("meta"):
                self.build(config)
            self._load_mapped_state(state)
        device = default_device(device)
        self.to(device=device, dtype=default_dtype(device, dtype))
        self.eval()

    @classmethod
    def from_pretrained(cls, ckpt, *, device=None, dtype=None):
        """Loads a checkpoint directory or hub id; bf16 on CUDA and float32 on the CPU by default."""
        return cls(ckpt=ckpt, device=device, dtype=dtype)

    def _load_mapped_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict().keys())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match {type(self).__name__}: missing {missing[:6]}"
                f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                f"{'...' if len(unexpected) > 6 else ''}"
            )
        self.load_state_dict(state, strict=True, assign=True)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def config_from_dict(cls, config_dict: dict):
        raise NotImplementedError

    def build(self, config) -> None:
        raise NotImplementedError

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
