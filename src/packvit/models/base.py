"""The packed model of every family: one forward template, loading, metadata, outputs.

A family subclasses ``PackedVisionModel`` and supplies only what is its own:

- ``config_class`` (a ``VisionConfig``) and ``build(config)``, which creates ``embeddings``,
  ``blocks`` (``EncoderBlock``s), ``final_norm`` and ``head`` (either may be ``None``);
- ``map_checkpoint(state)``: one visible function from checkpoint names to its own;
- ``prepare_positions(meta)``: the position data of a pack (rotary tables, position embeddings
  or table rows), filled into the pack's metadata (which holds ``patch_positions`` and
  ``interpolate_pos_encoding``);
- ``embeddings(patches, meta)`` → the packed sequence ``[S, D]``, and ``pool(x, meta, prefix_tokens)``
  where the pooled output is not the ``head`` applied to the segments;
- what callers ask of a family instead of its name: the class attributes ``patch_layout``,
  ``takes_video``, ``has_cls_token``, ``reads_patch_positions``, and ``placeholder_grid()``.

The template (``encode``): validate → metadata (host, once) → embed → blocks (or a caller's
replacement for the stack: captured graphs) → final norm → split prefix and patch tokens → pool →
``PackedVisionOutput``. Gradient checkpointing, compiled layers and the choice of hidden states to
keep live here, once for all families. ``forward`` is ``model(batch)``; the earlier call forms are
translated to the template in one place (``_compat_call``).

Training goes through the same forward. Every block's recompute under gradient checkpointing
reuses the pack's metadata; compiled blocks see only tensors of symbolic length (the segment
structure reaches the eager attention call alone); ``compute_dtype`` names the activation dtype
where it differs from the parameters' (FSDP2 mixed precision).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import (checkpoint_sources, mismatch_in_checkpoint_names, read_config_dict, read_state_dict,
                          resolve_checkpoint, write_checkpoint)
from ..batch_invariant import from_environment as batch_invariant_from_environment
from ..batch_invariant import attention_backend as invariant_attention_backend
from ..batch_invariant import runs_batch_invariant, with_invariant_kernels
from ..cuda_graphs import AUTO_BUDGETS, AUTO_MAX_ITEMS, GraphedEncoder, graph_backend
from ..fp8 import FP8, check_apply, quantize_model
from ..layers import VarlenContext, run_layer
from ..packing import PackedBatch, item_token_counts, prefix_token_index, to_device, validate_grid_thw, validate_patches
from ..positions import RotaryTable, TableLookup
from .config import VisionConfig

__all__ = [
    "PackedVisionOutput",
    "PackMetadata",
    "PackedVisionModel",
    "default_device",
    "default_dtype",
    "normalize_layer_indices",
    "PACKVIT_FORMAT_KEY",
]

#: ``config.json`` key marking a checkpoint written by packvit's ``save_pretrained`` (packvit's names)
PACKVIT_FORMAT_KEY = "packvit_format"


@dataclass
class PackedVisionOutput:
    """Outputs of a packed model, the same for every family.

    ``last_hidden_state [total_patches, hidden]``: patch tokens after the final norm, in input
    order (``None`` for a ``hidden_states_only`` forward). ``pooler_output [num_items, hidden]`` or
    ``None`` (no pooled output, or ``output_pooled=False``): one row per ``grid_thw`` row.
    ``prefix_tokens [num_items, num_prefix, hidden]`` for families with CLS/register tokens, else
    ``None``. ``hidden_states``, on request: the embeddings (entry 0) and each block's output,
    before the final norm, patch tokens only ``[total_patches, hidden]`` each; with
    ``hidden_layers`` only the entries asked for, in that order. ``prefix_hidden_states``: the
    prefix tokens of the same entries, ``[num_items, num_prefix, hidden]`` each.
    """

    last_hidden_state: torch.Tensor | None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    prefix_tokens: torch.Tensor | None = None
    prefix_hidden_states: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        """The fields that are not ``None``, in order."""
        return tuple(value for value in (self.last_hidden_state, self.pooler_output, self.hidden_states,
                                         self.prefix_tokens, self.prefix_hidden_states) if value is not None)


@dataclass
class PackMetadata:
    """Everything a forward needs to know about a pack's shape, built once on the host from
    ``grid_thw`` and copied to the model's device: pass it back as ``model(..., metadata=meta)`` to
    reuse it (several forwards of one pack, a training step's recompute, captured graphs).

    It records what it was built from, and a forward given it checks each against its own
    inputs and settings: the ``grid_thw``, the ``patch_positions`` (the tensor given, or ``None``),
    ``interpolate_pos_encoding``, ``device`` and ``dtype``, the attention backend
    (``context.backend``) and ``model``, the family and configuration of the model.

    ``context``: attention segments (one per item: prefix tokens then patches). With prefix tokens,
    ``patch_rows [total_patches]`` and ``prefix_rows [num_items * P]`` are the sequence rows of the
    patches and of the prefix tokens, and ``source_index [S]`` the row of ``cat(prefix table,
    patch embeddings)`` each sequence position takes. Position data, per family: ``rotary`` (cos,
    sin), ``position_embeddings [total_patches, D]`` (parameter-free tables), or ``position_lookup``
    (where every patch reads a learned table resized to its grid).
    """

    grid_thw: torch.Tensor
    context: VarlenContext
    device: torch.device
    dtype: torch.dtype
    model: tuple[str, VisionConfig]
    patch_positions: torch.Tensor | None = None
    interpolate_pos_encoding: bool = False
    num_prefix_tokens: int = 0
    patch_rows: torch.Tensor | None = None
    prefix_rows: torch.Tensor | None = None
    source_index: torch.Tensor | None = None
    rotary: RotaryTable | None = None
    position_embeddings: torch.Tensor | None = None
    position_lookup: TableLookup | None = None

    @property
    def num_items(self) -> int:
        return self.grid_thw.shape[0]

    @property
    def total_patches(self) -> int:
        return self.context.segments.total - self.num_items * self.num_prefix_tokens


def default_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, dtype=None) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere, unless asked otherwise (a ``torch.dtype`` or its name)."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'float32' or 'fp8'")
        return getattr(torch, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _one_spelling(name: str, value, alias: str, alias_value):
    """``value``, or ``alias_value`` where only the alias (transformers' spelling) is given."""
    if value is not None and alias_value is not None:
        raise ValueError(f"pass {name} or {alias} (the same setting in transformers' spelling), not both")
    return value if value is not None else alias_value


def _single_device(device_map):
    """The one device a transformers-style ``device_map`` names (``None`` and ``"auto"``: the default)."""
    if device_map is None or device_map == "auto":
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map {device_map} spreads the model over {sorted(map(str, devices))}; a packed model runs "
                f"on one device: pass device='cuda:0' (or one device for every module)"
            )
        (device_map,) = devices
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def normalize_layer_indices(hidden_layers: Sequence[int], num_layers: int) -> list[int]:
    """Indices into the ``num_layers + 1`` hidden states (negative from the end) → ``0 .. num_layers``."""
    normalized = []
    for index in hidden_layers:
        if not isinstance(index, int) or isinstance(index, bool) or not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(
                f"hidden layer {index!r} does not exist: the model has {num_layers + 1} hidden states (0 = the "
                f"embeddings, {num_layers} = the last block; negative indices count from the end)"
            )
        normalized.append(index % (num_layers + 1))
    return normalized


def _same_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint map of packvit's own format: every tensor under its name."""
    return dict(state)


def _listed(names: Sequence[str], limit: int = 6) -> str:
    """``['a', 'b', ...]``: the first ``limit`` names, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{list(names[:limit])}{more}"


def _same_positions(prepared: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    """Whether the ``patch_positions`` a pack's metadata was built from are those given now:
    the same tensor, or equal host tensors."""
    if prepared is None or given is None:
        return prepared is given
    if prepared is given:
        return True
    on_host = prepared.device.type == "cpu" and given.device.type == "cpu"
    return on_host and prepared.shape == given.shape and torch.equal(prepared, given)


def _describe_positions(positions: torch.Tensor | None) -> str:
    if positions is None:
        return "none, positions from the grid"
    where = "" if positions.device.type == "cpu" else f" on {positions.device}, compared as the same tensor"
    return f"a [{positions.shape[0]}, 3] tensor{where}"


class PackedVisionModel(nn.Module):
    """A vision transformer on packed sequences.

    ``Model(config)`` builds random weights; ``Model(ckpt=dir_or_hub_id)`` or
    ``Model.from_pretrained(...)`` loads a checkpoint (bf16 on CUDA, float32 on the CPU, unless
    ``dtype`` says otherwise); ``config_overrides`` replace configuration fields, and the weights
    must then match the architecture exactly (loading never changes the architecture silently);
    ``interpolate_pos_encoding`` and ``batch_invariant`` set the attributes of those names.

    ``model(batch)`` with a ``PackedBatch`` (moved to the model's device and dtype here) returns a
    ``PackedVisionOutput``; ``encode`` is the template behind it. ``model(patches, grid_thw)`` is
    the earlier tensor form (see ``forward``).
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type[VisionConfig]] = VisionConfig
    #: how the model's patch embedding reads a flattened patch: "ppc" (p, p, C) or "cpp" (C, p, p)
    patch_layout: ClassVar[str] = "ppc"
    #: whether an item may have t > 1 frames (one attention segment per clip)
    takes_video: ClassVar[bool] = False
    #: whether the first prefix token of every item is a CLS token (``VisionTower``'s ``"cls_patch"``)
    has_cls_token: ClassVar[bool] = False
    #: whether the positions come from ``patch_positions`` where a batch has them (else they are refused)
    reads_patch_positions: ClassVar[bool] = False
    #: what ``model(patches, grid_thw)`` returns without ``return_dict``: the output object, or
    #: (``False``) the ``last_hidden_state`` tensor
    returns_output_by_default: ClassVar[bool] = False

    def __init__(self, config: VisionConfig | None = None, *, ckpt=None, device=None, dtype=None,
                 interpolate_pos_encoding: bool = False, batch_invariant: bool | None = None, **config_overrides):
        super().__init__()
        if (config is None) == (ckpt is None):
            raise ValueError("pass a configuration to build random weights, or ckpt= to load a checkpoint, not both")
        config_dict = None
        if ckpt is not None:
            directory = resolve_checkpoint(ckpt)
            config_dict = read_config_dict(directory)
            config = self.config_from_dict(config_dict, **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        state, source = None, None
        if config_dict is not None:
            state = read_state_dict(directory)
            checkpoint_map = _same_names if config_dict.get(PACKVIT_FORMAT_KEY) else self.map_checkpoint
            source = (checkpoint_map, set(state))
            state = checkpoint_map(state)
        #: resize a learned position table made for one grid (AIMv2's fixed-size checkpoints) to the
        #: pack's grids instead of refusing them (beyond the reference); read by ``prepare``
        self.interpolate_pos_encoding = interpolate_pos_encoding
        #: attention backend name for every varlen call of this model (None: automatic)
        self.attention_backend: str | None = None
        #: run each encoder block through torch.compile: True, False, or None for automatic
        #: (compiled for CUDA inference; see packvit.layers.layers_compiled)
        self.compile_layers: bool | None = None
        #: recompute each block in the backward pass instead of storing its activations
        self.gradient_checkpointing = False
        self._checkpoint_kwargs: dict = {}
        #: dtype of the activations and of the pack's metadata when it is not the parameters' dtype
        #: (FSDP2 mixed precision keeps float32 parameters and computes in its param_dtype); None:
        #: the parameters' dtype
        self.compute_dtype: torch.dtype | None = None
        #: the automatic graphs (cuda_graphs) and what they were made for, or None: (device, dtype,
        #: attention backend, first parameter's storage) → GraphedEncoder (None: cannot be captured)
        self._auto_graphs: tuple[tuple, GraphedEncoder | None] | None = None
        self.cuda_graphs = True
        #: "fp8" where the blocks' projections compute in e4m3 (``dtype="fp8"``, packvit.fp8), else None
        self.quantization: str | None = None
        #: every output of an item bit-identical whatever else is in its pack (packvit.batch_invariant);
        #: the constructor's None reads PACKVIT_BATCH_INVARIANT
        self.batch_invariant = batch_invariant_from_environment() if batch_invariant is None else bool(batch_invariant)
        if state is None:
            self.build(config)
        else:
            with torch.device("meta"):
                self.build(config)
            self._load_mapped_state(state, ckpt, source)
        if device is None and self.device.type == "meta":  # built under torch.device("meta"): stays there
            device = self.device
        device = default_device(device)
        if isinstance(dtype, str) and dtype == FP8:
            self.to(device=device)  # quantised from the checkpoint's own precision
            quantize_model(self)
        else:
            self.to(device=device, dtype=default_dtype(device, dtype))
        self.eval()

    @classmethod
    def from_pretrained(cls, ckpt, *, device=None, dtype=None, torch_dtype=None, device_map=None, **config_overrides):
        """Loads a checkpoint directory or hub id; bf16 on CUDA and float32 on the CPU by default,
        ``dtype="fp8"`` for the blocks' projections in e4m3 (``packvit.fp8``).

        ``torch_dtype`` and ``device_map`` are transformers' spellings of ``dtype`` and ``device``
        (the earlier packed models were transformers models): a ``device_map`` names one device
        (or ``"auto"``, the default device), since a packed model lives on one device.
        ``batch_invariant=True``: see the attribute (``docs/batch_invariance.md``).
        """
        dtype = _one_spelling("dtype", dtype, "torch_dtype", torch_dtype)
        device = _one_spelling("device", device, "device_map", _single_device(device_map))
        return cls(ckpt=ckpt, device=device, dtype=dtype, **config_overrides)

    @classmethod
    def config_from_dict(cls, config_dict: dict, **overrides) -> VisionConfig:
        """The configuration of a checkpoint's ``config.json``; ``ValueError`` for another family's."""
        return cls.config_class.from_dict(config_dict, **overrides)

    def _load_mapped_state(self, state: dict[str, torch.Tensor], ckpt, source=None) -> None:
        """Loads ``state`` (this model's names) into the model built on the meta device. ``source``:
        ``(checkpoint_map, checkpoint tensor names)`` that gave it, so that a mismatch is reported
        in the checkpoint's own names; ``None`` where ``state`` is already in the checkpoint's names."""
        checkpoint_map, names = source or (_same_names, set(state))
        shapes = {key: value.shape for key, value in self.state_dict().items()}
        if state.keys() != shapes.keys():
            missing, unexpected, unplaced = mismatch_in_checkpoint_names(checkpoint_map, names, set(shapes))
            untraced = f"; no checkpoint tensor gives packvit's {_listed(unplaced)}" if unplaced else ""
            raise ValueError(
                f"checkpoint {ckpt} does not match the {type(self).__name__} its config.json describes: missing "
                f"{_listed(missing)}, unexpected {_listed(unexpected)} (the checkpoint's names){untraced}. The "
                f"checkpoint is incomplete, or its config.json is of another variant (check use_head and "
                f"num_hidden_layers); packvit never drops or adds modules to make weights fit"
            )
        wrong = [key for key, value in state.items() if value.shape != shapes[key]]
        if wrong:
            names_of = checkpoint_sources(checkpoint_map, names).get(wrong[0], (wrong[0],))
            raise ValueError(
                f"checkpoint tensor {' + '.join(names_of)} gives {wrong[0]} the shape {tuple(state[wrong[0]].shape)} "
                f"but the architecture in config.json needs {tuple(shapes[wrong[0]])}; the weights and config.json "
                f"disagree"
            )
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, directory) -> None:
        """Writes ``config.json`` and ``model.safetensors`` that ``from_pretrained`` loads back
        (packvit's own parameter names, marked in ``config.json``)."""
        if self.quantization is not None:
            raise ValueError(
                f"an {self.quantization} model is not saved: save the bf16 or float32 model it was loaded from, and "
                f"load that with from_pretrained(..., dtype={self.quantization!r}), which quantises in seconds"
            )
        config_dict, state = self.export_checkpoint()
        write_checkpoint(Path(directory), config_dict, state)

    def export_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The ``(config dict, state dict)`` that ``save_pretrained`` writes."""
        return {**self.config.to_dict(), PACKVIT_FORMAT_KEY: 1}, self.state_dict()

    # --- what every model exposes ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the pack's metadata and activations are built in: ``compute_dtype`` if set,
        else the parameters' dtype."""
        return self.compute_dtype or self.dtype

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def patch_dim(self) -> int:
        return self.config.patch_dim

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens (CLS, registers) placed before every item's patches; 0 for most families."""
        return 0

    def placeholder_grid(self) -> torch.Tensor:
        """The smallest ``grid_thw [1, 3]`` (host) the model accepts: one patch, unless its
        positions serve one grid only."""
        return torch.ones(1, 3, dtype=torch.int64)

    # --- family hooks ------------------------------------------------------------------------

    def build(self, config) -> None:
        raise NotImplementedError

    def map_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names → this model's (``self.config`` is set)."""
        raise NotImplementedError

    def prepare_positions(self, meta: PackMetadata) -> None:
        """Fills the pack's position data into ``meta``."""

    def embed(self, patches: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """``patches [total_patches, patch_dim]`` → the packed sequence ``[S, D]`` (prefix tokens included)."""
        return self.embeddings(patches, meta)

    def pool(self, x: torch.Tensor, meta: PackMetadata, prefix_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """``x [S, D]`` after the final norm → ``[num_items, D]``, or ``None`` without a pooled output."""
        return self.head(x, meta.context) if self.head is not None else None

    # --- training ----------------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute every block in the backward pass (non-reentrant ``torch.utils.checkpoint``).

        The pack's metadata is built once per forward on the host and reused by the recompute, so
        the recomputed block sees exactly the segments of the forward and reads nothing back from
        the device. ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``;
        ``preserve_rng_state`` is off unless asked for, since no block draws random numbers.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ValueError("packvit checkpoints blocks non-reentrantly; use_reentrant=True is not supported")
        self._checkpoint_kwargs = {"preserve_rng_state": False, **kwargs}
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    # --- runtime modes -----------------------------------------------------------------------

    #: the modes ``runtime`` sets: model attributes that change how a forward runs, not what it computes
    RUNTIME_MODES: ClassVar[tuple[str, ...]] = ("attention_backend", "compile_layers", "gradient_checkpointing",
                                                "cuda_graphs", "batch_invariant")

    @property
    def cuda_graphs(self) -> bool:
        """Whether ``model(batch)`` in inference on CUDA runs small packs (up to ``AUTO_MAX_ITEMS``
        items and ``AUTO_BUDGETS[-1]`` sequence tokens) through CUDA graphs of the block stack,
        captured on first use per token budget (that first call takes the capture's time) and kept
        until the model moves, is cast or loads new parameter tensors. The outputs are those of
        the eager forward (``packvit.cuda_graphs``); memory: the static buffers and one shared
        graph pool, the working set of the largest budget used. Packs with hidden states, given
        ``metadata``, gradients, ``compile_layers=True``, ``batch_invariant`` or an attention backend
        that cannot be captured run eagerly. Turned off, the graphs captured so far are kept for when it is turned
        on again (``model.runtime(cuda_graphs=False)`` for a block); moving or casting the model frees them."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        self._cuda_graphs = bool(enabled)

    def _graphed(self, batch: PackedBatch, pool: bool) -> PackedVisionOutput | None:
        """``model(batch)`` through the automatic graphs, or ``None`` where they do not apply."""
        if not (self._cuda_graphs and not torch.is_grad_enabled() and self.compile_layers is not True
                and not self.batch_invariant):
            return None
        first = next(self.parameters())
        if (first.device.type != "cuda" or type(first) is not nn.Parameter  # sharded (FSDP2) parameters: eager
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return None
        key = (first.device, self.activation_dtype, self.attention_backend, first.data_ptr())
        if self._auto_graphs is None or self._auto_graphs[0] != key:
            try:
                graph_backend(self, first.device, self.activation_dtype)
            except ValueError:  # an attention backend that cannot be captured ('reference'): eager
                graphs = None
            else:
                graphs = GraphedEncoder(self, AUTO_BUDGETS, max_items=AUTO_MAX_ITEMS, fallback=False, lazy=True)
            self._auto_graphs = (key, graphs)
        graphs = self._auto_graphs[1]
        return graphs.run(batch, pool=pool) if graphs is not None else None

    def _apply(self, fn, recurse=True):
        if self.quantization is not None:
            check_apply(self, fn)  # an fp8 layer cannot be cast: refused before anything moves
        self._auto_graphs = None  # moved or cast: the graphs read the old tensors
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._auto_graphs = None  # assign=True replaces the tensors the graphs read
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        return {**super().__getstate__(), "_auto_graphs": None}  # graphs are not copied (deepcopy, pickling)

    @contextlib.contextmanager
    def runtime(self, **modes):
        """Sets runtime modes for the duration of a ``with`` block and restores them after it::

            with model.runtime(compile_layers=True, attention_backend="fa4"):
                model(batch)

        Any attribute of ``RUNTIME_MODES`` may be given; an unknown name is a ``ValueError``.
        """
        unknown = sorted(set(modes) - set(self.RUNTIME_MODES))
        if unknown:
            raise ValueError(f"unknown runtime modes {unknown}; model.runtime takes {list(self.RUNTIME_MODES)}")
        saved = {name: getattr(self, name) for name in modes}
        try:
            for name, value in modes.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # --- the forward template ----------------------------------------------------------------

    def prepare(self, inputs, patch_positions: torch.Tensor | None = None, *,
                interpolate_pos_encoding: bool | None = None, context: VarlenContext | None = None) -> PackMetadata:
        """The metadata of a pack (a ``PackedBatch``, or a ``grid_thw`` with optional
        ``patch_positions``), on the model's device. ``interpolate_pos_encoding``: ``None`` reads
        the model's attribute. ``context``: the pack's attention segments where they are already on
        the device (a captured graph's static buffers), instead of copying them there.

        Built on the host from the grid, copied with non-blocking transfers; reads nothing back.
        """
        if isinstance(inputs, PackedBatch):
            grid_thw, patch_positions = inputs.grid_thw, inputs.patch_positions
        else:
            grid_thw = validate_grid_thw(inputs)
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.interpolate_pos_encoding
        self._check_frames(grid_thw)
        if patch_positions is not None and not self.reads_patch_positions:
            raise ValueError(
                f"{type(self).__name__} places its patches by their grid and has no use for patch_positions; "
                f"pass the batch without them (the OneVision Encoder is the family that reads them)"
            )
        device, dtype, num_prefix = self.device, self.activation_dtype, self.num_prefix_tokens
        counts = item_token_counts(grid_thw)
        lengths = [num_prefix + n for n in counts]
        if context is None:
            context = VarlenContext.from_lengths(lengths, device, backend=self._pack_attention_backend())
        elif list(context.segments.lengths) != lengths:
            raise ValueError(
                f"the attention segments given ({len(context.segments.lengths)} of {context.segments.total} tokens) "
                f"are not this pack's ({len(lengths)} of {sum(lengths)}); build them from the pack's grid"
            )
        meta = PackMetadata(
            grid_thw=grid_thw,
            context=context,
            device=device, dtype=dtype, model=self._metadata_owner, patch_positions=patch_positions,
            interpolate_pos_encoding=bool(interpolate_pos_encoding), num_prefix_tokens=num_prefix,
        )
        if num_prefix:
            prefix_rows, patch_rows = prefix_token_index(counts, num_prefix)
            source_index = np.empty(meta.context.segments.total, dtype=np.int64)
            source_index[prefix_rows.numpy().ravel()] = np.tile(np.arange(num_prefix), len(counts))
            source_index[patch_rows.numpy()] = num_prefix + np.arange(patch_rows.numel())
            # the three index maps travel in one non-blocking copy
            maps = [torch.from_numpy(source_index), patch_rows, prefix_rows.flatten()]
            joined = to_device(torch.cat(maps), device).split([m.numel() for m in maps])
            meta.source_index, meta.patch_rows, meta.prefix_rows = joined
        self.prepare_positions(meta)
        return meta

    @property
    def _metadata_owner(self) -> tuple[str, VisionConfig]:
        """What a pack's metadata depends on of the model besides device, dtype and backend."""
        return self.family, self.config

    def _check_frames(self, grid_thw: torch.Tensor) -> None:
        if not self.takes_video and (grid_thw[:, 0] != 1).any():
            row = grid_thw[grid_thw[:, 0] != 1][0].tolist()
            raise ValueError(
                f"{type(self).__name__} encodes images: every grid_thw row needs t = 1, got {row}; encode a "
                f"clip's frames as images of their own with batch.frames_as_items() (PackedBatch)"
            )

    def forward(
        self,
        inputs=None,
        grid_thw=None,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        metadata: PackMetadata | None = None,
        hidden_layers: Sequence[int] | None = None,
        hidden_states_only: bool = False,
        output_pooled: bool = True,
        interpolate_pos_encoding: bool | None = None,
        hidden_states: torch.Tensor | None = None,
    ):
        """Encodes a pack: ``model(batch)`` → ``PackedVisionOutput``.

        ``batch``: a ``PackedBatch`` in the model's ``patch_layout`` (moved to the model's device and
        dtype here). ``metadata``: a ``PackMetadata`` from ``prepare(batch)``, reused instead of
        built again. ``hidden_layers``: the hidden states to return (0 = the embeddings, -1 = the
        last block, before the final norm). ``hidden_states_only``: with ``hidden_layers``, those
        hidden states alone: no block past the deepest of them runs, nor the final norm and the
        pooling (``last_hidden_state``, ``prefix_tokens`` and ``pooler_output`` are ``None``).
        ``output_pooled=False``: the pooling head does not run (``pooler_output`` is ``None``).

        The earlier call forms, translated by ``_compat_call`` (the only place they exist): the
        patches ``[total_patches, patch_dim]`` (also as ``hidden_states=``) with ``grid_thw
        [num_items, 3]`` and, for models that read them, ``patch_positions [total_patches, 3]``;
        ``output_hidden_states`` (every hidden state); ``return_dict``; ``interpolate_pos_encoding``
        for this call (see the model's attribute). ``patch_positions``, ``output_hidden_states``
        and ``return_dict`` may be given by position, in the order of OneVision's published
        ``LlavaViTPackingModel.forward``. Those forms return a ``PackedVisionOutput`` for a
        ``PackedBatch`` or ``return_dict=True``; for patches without ``return_dict``, what the
        family's published packed model returned (``returns_output_by_default``): the output, or
        the ``last_hidden_state`` tensor.
        """
        earlier = (grid_thw, patch_positions, output_hidden_states, return_dict, interpolate_pos_encoding, hidden_states)
        if not isinstance(inputs, PackedBatch) or any(value is not None for value in earlier):
            return self._compat_call(inputs, *earlier, metadata=metadata, hidden_layers=hidden_layers,
                                     hidden_states_only=hidden_states_only, output_pooled=output_pooled)
        return self._run(inputs, metadata, hidden_layers, hidden_states_only, output_pooled)

    def _run(self, batch: PackedBatch, metadata: PackMetadata | None, layers, stop_early: bool, pool: bool):
        """``encode``, or the automatic graphs where they apply (small packs in inference on CUDA)."""
        if metadata is None and layers is None and not stop_early:
            graphed = self._graphed(batch, pool)
            if graphed is not None:
                return graphed
        return self.encode(batch, metadata=metadata, layers=layers, stop_early=stop_early, pool=pool)

    def _compat_call(self, inputs, grid_thw, patch_positions, output_hidden_states, return_dict,
                     interpolate_pos_encoding, hidden_states, *, metadata, hidden_layers, hidden_states_only,
                     output_pooled):
        """The earlier call forms → ``encode``; a contradiction between them and the documented
        keywords is refused, never resolved."""
        if hidden_states is not None:
            if inputs is not None:
                raise ValueError("pass the patches once: as the first argument or as hidden_states=, not both")
            inputs = hidden_states
        if isinstance(inputs, PackedBatch):
            if grid_thw is not None or patch_positions is not None:
                raise ValueError("pass a PackedBatch alone, or patches with grid_thw (and patch_positions), not both")
            batch, as_output = inputs, return_dict is not False
        else:
            if inputs is None or grid_thw is None:
                raise ValueError("pass a PackedBatch, or patches [total_patches, patch_dim] with grid_thw [num_items, 3]")
            batch = PackedBatch(inputs, grid_thw, self.patch_layout, patch_positions)
            as_output = self.returns_output_by_default if return_dict is None else return_dict
        if output_hidden_states:
            if hidden_layers is not None:
                raise ValueError(
                    "output_hidden_states=True asks for every hidden state and hidden_layers for some of them; "
                    "pass one of the two"
                )
            hidden_layers = range(self.num_hidden_layers + 1)
        setting = self.interpolate_pos_encoding
        if interpolate_pos_encoding is not None:  # the model's attribute, for this call
            self.interpolate_pos_encoding = interpolate_pos_encoding
        try:
            output = self._run(batch, metadata, hidden_layers, hidden_states_only, output_pooled)
        finally:
            self.interpolate_pos_encoding = setting
        if as_output:
            return output
        return output.to_tuple() if self.returns_output_by_default else output.last_hidden_state

    @runs_batch_invariant
    def encode(self, batch: PackedBatch, *, metadata: PackMetadata | None = None, layers: Sequence[int] | None = None,
               stop_early: bool = False, pool: bool = True, blocks=None) -> PackedVisionOutput:
        """The forward template: check → metadata → embed → blocks → final norm → split → pool.

        ``metadata``: from ``prepare(batch)``, or built here. ``layers``: the hidden states to keep
        (indices as in ``forward``'s ``hidden_layers``); ``stop_early``: return those alone, running
        no block past the deepest. ``pool=False``: no pooling head. ``blocks``: a callable
        ``(x [S, D], metadata) -> [S, D]`` run in place of the block stack (the replay of captured
        graphs); the sequence it returns must stay valid until the template has used it. With
        ``batch_invariant`` the template runs under ``packvit.batch_invariant``'s kernels.
        """
        self._check_batch(batch)
        if metadata is None:
            metadata = self.prepare(batch)
        else:
            self._check_metadata(metadata, batch)
        keep = [] if layers is None else normalize_layer_indices(layers, self.num_hidden_layers)
        if stop_early and not keep:
            raise ValueError("hidden_states_only=True needs the hidden states to compute: pass hidden_layers=[...]")
        if blocks is not None and keep:
            raise ValueError("a blocks= hook replaces the whole block stack, so it gives no hidden states; pass no layers")
        patches = batch.patches.to(device=metadata.device, non_blocking=True).to(metadata.dtype)
        x = self.embed(patches, metadata)  # [S, D]
        if blocks is None:
            x, kept = self.run_blocks(x, metadata, keep, num_blocks=max(keep) if stop_early else None)
        else:
            x, kept = blocks(x, metadata), {}
        hidden = [self.split_prefix(kept[index], metadata) for index in keep]
        hidden_states = tuple(h for h, _ in hidden) if keep else None
        prefix_hidden_states = tuple(p for _, p in hidden) if keep and metadata.num_prefix_tokens else None
        if stop_early:
            return PackedVisionOutput(None, hidden_states=hidden_states, prefix_hidden_states=prefix_hidden_states)
        if self.final_norm is not None:
            x = self.final_norm(x)
        patch_tokens, prefix_tokens = self.split_prefix(x, metadata)
        return PackedVisionOutput(
            last_hidden_state=patch_tokens,
            pooler_output=self.pool(x, metadata, prefix_tokens) if pool else None,
            hidden_states=hidden_states,
            prefix_tokens=prefix_tokens,
            prefix_hidden_states=prefix_hidden_states,
        )

    def _check_batch(self, batch: PackedBatch) -> None:
        if not isinstance(batch, PackedBatch):
            raise ValueError(f"pass a PackedBatch (the model's processor makes one), got {type(batch).__name__}")
        if batch.patch_layout != self.patch_layout:
            raise ValueError(
                f"the batch's patches are flattened {batch.patch_layout!r} but {type(self).__name__} reads "
                f"{self.patch_layout!r} ({'(p, p, C)' if self.patch_layout == 'ppc' else '(C, p, p)'}); build the "
                f"batch with this model's processor: packvit.load_processor(model)"
            )
        if batch.origin is not None and batch.origin.family != self.family:
            raise ValueError(
                f"the batch was made by the {batch.origin.family} processor, and {type(self).__name__} is a "
                f"{self.family} model: its pixels are resized and normalised for another model (mean "
                f"{batch.origin.image_mean}, std {batch.origin.image_std}); build the batch with this model's "
                f"processor: packvit.load_processor(model)"
            )
        validate_patches(batch.patches, batch.grid_thw, self.patch_dim)
        if batch.patches.device.type == "meta":
            raise ValueError("patches are on the meta device and hold no values; pass real pixel data")

    def _check_metadata(self, meta: PackMetadata, batch: PackedBatch) -> None:
        """``ValueError`` unless ``meta`` is what ``prepare(batch)`` would build now. Host values
        only: positions on the device are compared by identity (a sync would be needed otherwise)."""
        redo = "call model.prepare(batch) for this batch"
        if meta.model != self._metadata_owner:
            raise ValueError(f"metadata was prepared by another model (a {meta.model[0]} of another configuration); {redo}")
        if meta.grid_thw is not batch.grid_thw and not torch.equal(meta.grid_thw, batch.grid_thw):
            raise ValueError(f"metadata was prepared for another grid_thw; {redo}")
        if not _same_positions(meta.patch_positions, batch.patch_positions):
            raise ValueError(
                f"metadata was prepared for other patch_positions ({_describe_positions(meta.patch_positions)}, the "
                f"batch has {_describe_positions(batch.patch_positions)}); {redo}"
            )
        if meta.interpolate_pos_encoding != bool(self.interpolate_pos_encoding):
            raise ValueError(
                f"metadata was prepared with interpolate_pos_encoding={meta.interpolate_pos_encoding} and the model "
                f"now has {bool(self.interpolate_pos_encoding)}; {redo}"
            )
        if meta.device != self.device or meta.dtype != self.activation_dtype:
            raise ValueError(
                f"metadata was prepared for {meta.device} {meta.dtype}, the model computes on {self.device} "
                f"{self.activation_dtype}; call model.prepare(batch) again after moving the model or setting "
                f"compute_dtype"
            )
        backend = self._pack_attention_backend()
        if meta.context.backend != backend:
            invariant = f" (batch-invariant mode: {backend!r})" if self.batch_invariant else ""
            raise ValueError(
                f"metadata was prepared for the attention backend {meta.context.backend!r} and the model now has "
                f"attention_backend={self.attention_backend!r}{invariant}; {redo}"
            )

    def _pack_attention_backend(self) -> str | None:
        """The attention backend of a pack's metadata: ``attention_backend``, or in batch-invariant
        mode the backend that mode runs (``packvit.batch_invariant.attention_backend``)."""
        if not self.batch_invariant:
            return self.attention_backend
        return invariant_attention_backend(self.device, self.activation_dtype, self.config.head_dim,
                                           self.attention_backend)

    def _run_block(self, block: nn.Module, x: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        call = functools.partial(run_layer, block, compiled=False if self.batch_invariant else self.compile_layers)
        if self.batch_invariant:  # also for the recompute of gradient checkpointing, in the backward pass
            call = with_invariant_kernels(call)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(call, x, meta.context, meta.rotary, use_reentrant=False, **self._checkpoint_kwargs)
        return call(x, meta.context, meta.rotary)

    def run_blocks(self, x: torch.Tensor, meta: PackMetadata, keep: Sequence[int] = (),
                   num_blocks: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The first ``num_blocks`` blocks (all by default) on the embedded sequence ``x [S, D]``.

        Returns the sequence ``[S, D]`` after the last block run, and ``{index: hidden state [S, D]}``
        for the indices in ``keep`` (0 = the embeddings). Nothing else is kept.
        """
        kept = {0: x} if 0 in keep else {}
        for index, block in enumerate(self.blocks[:num_blocks], start=1):
            x = self._run_block(block, x, meta)
            if index in keep:
                kept[index] = x
        return x, kept

    def split_prefix(self, x: torch.Tensor, meta: PackMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A sequence ``[S, D]`` → ``(patch tokens [total_patches, D], prefix tokens [N, P, D] or None)``."""
        if not meta.num_prefix_tokens:
            return x, None
        prefix = x.index_select(0, meta.prefix_rows).view(meta.num_items, meta.num_prefix_tokens, x.shape[-1])
        return x.index_select(0, meta.patch_rows), prefix
