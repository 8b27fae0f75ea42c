"""The model side of ``packvit embed``: loading a checkpoint, its processor, and one forward.

This module is the only one in ``packvit.embed`` that calls the model and processor API; the rest
sees an ``Encoder``: ``encoder(batch)`` → pooled embeddings and the requested token layers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import read_config_dict, resolve_checkpoint
from ..models.registry import family_config, model_class
from ..packing import PackedBatch
from ..preprocess import load_processor

__all__ = ["ProcessorSpec", "CheckpointInfo", "describe_checkpoint", "Encoder", "load_encoder", "token_names"]


def token_names(layers: Sequence[int] | None) -> list[str]:
    """Names of the token tensors written for ``layers``: ``last_hidden_state`` when no layers are
    asked, else ``hidden_states.{index}`` for each."""
    return ["last_hidden_state"] if not layers else [f"hidden_states.{index}" for index in layers]


@dataclass(frozen=True)
class ProcessorSpec:
    """How to build a checkpoint's processor in a worker process (a picklable recipe)."""

    checkpoint: str
    family: str
    native: bool = True
    max_num_patches: int | None = None

    @classmethod
    def of(cls, info: "CheckpointInfo", native: bool = True, max_num_patches: int | None = None) -> "ProcessorSpec":
        return cls(str(info.directory), info.family, native, max_num_patches)

    def probe(self) -> PackedBatch:
        """The processor built and run on one small grey image; ``ValueError`` where the family's
        processor refuses these settings."""
        from PIL import Image

        try:
            return self.build()(images=[Image.new("RGB", (64, 64), (128, 128, 128))])
        except ValueError as error:
            hint = "" if not self.native else "; pass --fixed for the published fixed-size processor"
            raise ValueError(f"the {self.family} processor of {self.checkpoint} refuses these settings ({error}){hint}") from error

    def build(self):
        """The processor: ``processor(images=None, videos=None) -> PackedBatch``."""
        return functools.partial(load_processor(self.checkpoint), native=self.native,
                                 max_num_patches=self.max_num_patches)


@dataclass(frozen=True)
class CheckpointInfo:
    """What identifies a checkpoint in a manifest: its family, a hash of its ``config.json`` and the
    sizes of its weight files."""

    checkpoint: str
    directory: Path
    family: str
    num_hidden_layers: int
    config_sha256: str
    weights: dict[str, int]

    def check_layers(self, layers: Sequence[int]) -> None:
        """Refuses hidden-state indices the model does not have (0 = embeddings, -1 = last layer)."""
        for index in layers:
            if not -(self.num_hidden_layers + 1) <= index <= self.num_hidden_layers:
                raise ValueError(
                    f"--layers {index} is out of range: {self.checkpoint} has {self.num_hidden_layers + 1} hidden "
                    f"states (0 = embeddings ... {self.num_hidden_layers} = last layer; -1 = last)")


def describe_checkpoint(checkpoint: str) -> CheckpointInfo:
    """Resolves a checkpoint directory or hub id and reads its identity (no weights are loaded)."""
    directory = resolve_checkpoint(checkpoint)
    config = read_config_dict(directory)
    family, family_settings = family_config(config, str(directory / "config.json"))
    return CheckpointInfo(
        checkpoint=str(checkpoint),
        directory=directory,
        family=family,
        num_hidden_layers=family_settings.num_hidden_layers,
        config_sha256=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        weights={file.name: file.stat().st_size for file in sorted(directory.glob("*.safetensors"))},
    )


@dataclass
class Encoder:
    """A loaded model, the checkpoint it came from, its processor recipe, and which tokens to return
    (none; ``last_hidden_state`` with ``save_tokens``; the hidden states ``layers`` with both)."""

    model: torch.nn.Module
    info: CheckpointInfo
    processor: ProcessorSpec
    save_tokens: bool = False
    layers: tuple[int, ...] = field(default=())

    @property
    def token_names(self) -> list[str]:
        return token_names(self.layers) if self.save_tokens else []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def takes_videos(self) -> bool:
        """Whether a clip is one item (OneVision's timeline) rather than frames as items."""
        return self.info.family == "llava_vit"

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch`` (on any device) → ``(pooled [num_items, D], {name: tokens [total_patches, D]})``
        for each of ``token_names``."""
        output = self._forward(batch)
        pooled = output.pooler_output
        if pooled is None:
            raise ValueError(f"{self.info.checkpoint} has no pooled output (no head); packvit embed writes pooled embeddings")
        if not self.save_tokens:
            return pooled, {}
        if not self.layers:
            return pooled, {"last_hidden_state": output.last_hidden_state}
        return pooled, dict(zip(token_names(self.layers), output.hidden_states))

    def _forward(self, batch: PackedBatch):
        if self.save_tokens and self.layers:
            return self.model(batch, hidden_layers=list(self.layers))
        return self.model(batch)


def load_encoder(info: CheckpointInfo, processor: ProcessorSpec, *, device=None, dtype=None, save_tokens: bool = False,
                 layers: Sequence[int] = ()) -> Encoder:
    """Loads a described checkpoint for embedding (see ``Encoder`` for the tokens it returns)."""
    info.check_layers(layers)
    model = model_class(info.family).from_pretrained(info.directory, device=device, dtype=dtype)
    return Encoder(model, info, processor, save_tokens, tuple(layers))
