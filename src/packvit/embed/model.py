"""The encode stage: a checkpoint's identity, its model loaded, and one pack → host outputs.

This module is the only one in ``packvit.embed`` that calls the model; the rest sees an
``Encoder``: ``encoder.encode(pack)`` → ``HostOutputs`` (pooled embeddings and the requested token
layers, on the host, in the output dtype). A pack arrives as uint8; the encoder turns it into the
model's input on the model's device: the workers' pixels normalised (the processor's second
stage), the GPU route's JPEGs decoded, turned upright and preprocessed there (``gpu_decode``,
``processor.on_device``).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..batch_invariant import normalize_rows
from ..checkpoint import read_config_dict, resolve_checkpoint
from ..models.base import normalize_layer_indices
from ..models.registry import family_config, model_class
from ..packing import PackedBatch
from .gpu_decode import JpegDecoder
from .layout import OutputFormat
from .packer import HostOutputs, Pack

__all__ = ["OUTPUT_FILES", "sha256_of", "CheckpointInfo", "describe_checkpoint", "Encoder", "load_encoder"]


#: the files of a checkpoint directory that decide a run's outputs: its configuration, its processor
#: settings, its weights and their index
OUTPUT_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json")


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's contents, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run needs to know of a checkpoint before loading it: its family and model shape, and
    (``file_hashes``) what identifies it in a manifest."""

    checkpoint: str
    directory: Path
    family: str
    num_hidden_layers: int
    head_dim: int
    #: whether the model takes a video as one item (else a video's frames are items)
    takes_video: bool

    def file_hashes(self) -> dict[str, str]:
        """``{file name: SHA-256 of its contents}`` of every ``OUTPUT_FILES`` file there is (reading
        every byte of the weights: about a second per 1.5 GB)."""
        files = sorted({path for pattern in OUTPUT_FILES for path in self.directory.glob(pattern) if path.is_file()})
        return {path.name: sha256_of(path) for path in files}

    def check_layers(self, layers: Sequence[int]) -> None:
        """Refuses hidden-state indices the model does not have (0 = embeddings, -1 = last layer)."""
        for index in layers:
            try:
                normalize_layer_indices([index], self.num_hidden_layers)
            except ValueError as error:
                raise ValueError(f"--layers {index} is out of range: {self.checkpoint}: {error}") from None


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
        head_dim=family_settings.head_dim,
        takes_video=model_class(family).takes_video,
    )


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor copied, without blocking, into pinned host memory."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class Encoder:
    """A loaded model and what to return per pack: pooled embeddings (L2-normalised with
    ``normalize``, row by row with batch-invariant kernels where the model is batch-invariant) and
    the token tensors ``token_names`` (``last_hidden_state``, or the hidden states ``layers``),
    stored as ``output_dtype``. ``processor`` normalises the packs' pixels; ``jpeg_decoder``
    decodes the GPU route's JPEGs (``None``: a run without that route).

    On CUDA a pack's inputs are copied, normalised and decoded on a side stream (overlapping the
    forward in flight), and the outputs come back by non-blocking copies into pinned memory.
    """

    def __init__(self, model: torch.nn.Module, processor=None, jpeg_decoder: JpegDecoder | None = None, *,
                 token_names: Sequence[str] = (), layers: Sequence[int] = (), normalize: bool = False,
                 output_dtype: str = "float16"):
        self.model = model
        self.processor = processor
        self.jpeg_decoder = jpeg_decoder
        self.token_names = tuple(token_names)
        self.layers = tuple(layers)
        self.normalize = normalize
        self.output_dtype = output_dtype
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._input_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch`` (on the model's device) → ``(pooled [num_items, D], {name: [num_tokens, D]})``."""
        output = self.model(batch, hidden_layers=list(self.layers)) if self.layers else self.model(batch)
        pooled = output.pooler_output
        if pooled is None:
            raise ValueError(f"{type(self.model).__name__} has no pooled output (no head); packvit embed writes "
                             f"pooled embeddings")
        if not self.token_names:
            return pooled, {}
        if not self.layers:
            return pooled, {"last_hidden_state": output.last_hidden_state}
        return pooled, dict(zip(self.token_names, output.hidden_states))

    @torch.inference_mode()
    def encode(self, pack: Pack) -> HostOutputs:
        """One pack → its outputs on the host, normalised and cast; the copies back are in flight on
        CUDA (``HostOutputs.ready``)."""
        batch = self.pack_batch(pack)
        if batch is None:
            return HostOutputs(None)
        pooled, tokens = self.forward(batch)  # [items, D], {name: [tokens, D]}
        if self.normalize:
            pooled = normalize_rows(pooled.float()) if getattr(self.model, "batch_invariant", False) else F.normalize(pooled.float(), dim=-1)
        dtype = getattr(torch, self.output_dtype)
        pooled, tokens = pooled.to(dtype), {name: value.to(dtype) for name, value in tokens.items()}
        if self.device.type != "cuda":
            return HostOutputs(pooled, tokens)
        outputs = HostOutputs(_to_host(pooled), {name: _to_host(value) for name, value in tokens.items()},
                              torch.cuda.Event())
        outputs.ready.record()
        return outputs

    @torch.inference_mode()
    def pack_batch(self, pack: Pack) -> PackedBatch | None:
        """A pack's items as the model's input on its device, in its dtype, in the pack's order
        (``packer``); ``None`` when no item is ok. The row of a JPEG that decodes nowhere becomes a
        failed row here (``JpegDecoder``)."""
        with self._on_input_stream():
            parts = []
            if pack.pixels is not None:  # uint8 [patches, patch_dim] → the model's dtype, on its device
                parts.append(self.processor.normalize(pack.pixels, device=self.device, dtype=self.dtype))
            if pack.jpegs is not None:
                parts += self._decoded_jpegs(pack)
            batch = None if not parts else parts[0] if len(parts) == 1 else PackedBatch.concat(parts)
        return self._hand_over(batch)

    def _decoded_jpegs(self, pack: Pack) -> list[PackedBatch]:
        """The pack's JPEGs decoded upright on the device and preprocessed there: ``[]`` or one batch,
        its grid written into the rows (the grid the worker computed from the header, unless the
        CPU opener, decoding a file nvJPEG refused, found another size)."""
        if self.jpeg_decoder is None:
            raise ValueError("this pack holds JPEG files for the GPU route, but the encoder has no JpegDecoder")
        rows = pack.jpeg_rows
        images = self.jpeg_decoder(pack.jpegs, rows)  # uint8 [3, H, W] each, the decoded files in order
        if not images:
            return []
        batch = self.processor.on_device(images, dtype=self.dtype)
        for row, grid in zip([row for row in rows if row.status == "ok"], batch.grid_thw.tolist()):
            row.grid = tuple(grid)
        return [batch]

    def output_format(self, probe: PackedBatch) -> OutputFormat:
        """The format of the outputs, from one forward of ``probe`` (also a warm-up)."""
        with self._on_input_stream():
            moved = probe.to(self.device)
        pooled, tokens = self.forward(self._hand_over(moved))
        token_dim = next((value.shape[-1] for value in tokens.values()), None)
        return OutputFormat(pooled.shape[-1], self.output_dtype, self.token_names, token_dim)

    def _on_input_stream(self):
        return torch.cuda.stream(self._input_stream) if self._input_stream is not None else contextlib.nullcontext()

    def _hand_over(self, batch: PackedBatch | None) -> PackedBatch | None:
        """A batch made on the input stream, made safe to use on the compute stream (on CUDA: the
        compute stream waits for it, and its patches' memory is kept until the compute stream is done)."""
        if batch is not None and self._input_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._input_stream)
            batch.patches.record_stream(compute)
        return batch


def load_encoder(info: CheckpointInfo, processor=None, jpeg_decoder: JpegDecoder | None = None, *, device=None,
                 dtype=None, token_names: Sequence[str] = (), layers: Sequence[int] = (), normalize: bool = False,
                 output_dtype: str = "float16", batch_invariant: bool = False) -> Encoder:
    """Loads a described checkpoint for embedding (see ``Encoder``), batch-invariant or not."""
    model = model_class(info.family).from_pretrained(info.directory, device=device, dtype=dtype,
                                                     batch_invariant=batch_invariant)
    return Encoder(model, processor, jpeg_decoder, token_names=token_names, layers=layers, normalize=normalize,
                   output_dtype=output_dtype)
