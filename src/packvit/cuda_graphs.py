"""CUDA graphs over token budgets: latency-bound calls (one image, a few images) without launch overhead.

``GraphedEncoder(model)`` captures the model's encoder blocks once per token budget (by default
256 to 4096 tokens) and serves ``graphed(batch)`` with the same ``PackedVisionOutput`` as
``model(batch)``. A pack of ``S`` sequence tokens (patches and prefix tokens) in ``N`` items runs in
the smallest budget ``B`` it fits: its tokens are copied into a static ``[B, D]`` buffer and the
rest of the buffer becomes filler segments, so the captured graph always sees the same shapes.

The graph holds the block stack alone, the many small launches of a forward. Everything else is
``model(batch)``'s own template (``PackedVisionModel.encode``): its checks, the pack's metadata,
the embeddings, the final norm, the split and the pooling run eagerly around the graph, which the
template calls through its ``blocks=`` hook; this module supplies only "load the static pack,
replay, slice ``[:S]``". Per budget the static inputs are

- ``x [B, D]``: rows ``0 .. S-1`` the pack's embedded sequence, the rest fillers (whatever the
  buffer held; they are never read back);
- ``cu_seqlens [K + 1]`` int32 with ``K = max_items + 1`` segments: the pack's ``N`` segments,
  one filler segment of the remaining tokens and one-token filler segments up to ``K``; every
  segment is non-empty, so real rows attend only to real rows and every varlen kernel sees a
  well-formed layout;
- ``cos, sin [B, hd]`` where the family has a rotary table;
- ``max_seqlen = B``, a fixed upper bound (safe for the varlen kernels).

Blocks work row by row except attention, which works within segments, so the pack's rows come
out of the graph exactly as they would from the unpadded pack; they are sliced out of the static
output (``[:S]``) and copied (the next replay overwrites it) before the final norm. A pack fits
budget ``B`` when it has at most ``max_items`` items and ``S + K - N <= B`` (room for one token per
unused segment slot). Packs that fit no budget are served by ``model(batch)`` (``fallback=True``,
the default, counted in ``fallback_calls``) or refused (``fallback=False``).

A pack's segments reach the device once: the padded ``cu_seqlens`` are copied from pinned host
memory without blocking into the static buffer, whose first ``N + 1`` entries are also the
pack's own ``cu_seqlens`` for the eager pooling (``StaticPack.context_for``); the embedded rows and
rotary rows follow device to device. Nothing is read back from the device, so a replayed call
makes no host sync.

``model(batch)`` uses the same machinery without being asked (``PackedVisionModel.cuda_graphs``):
in inference on CUDA, a pack of up to ``AUTO_MAX_ITEMS`` items that fits one of ``AUTO_BUDGETS``
runs through a lazy ``GraphedEncoder`` of the model, each budget captured by the first pack that
needs it.

Limits: the blocks inside the graphs are eager (``compile_layers=True`` is refused; ``None``, the
automatic setting, gives eager blocks in the graphs and applies to the fallback path); the
attention backend is resolved once, at capture, and must be capturable (``reference`` reads the
segment boundaries on the host and is refused); no hidden states; the graphs read the parameters
in place, so moving or casting the model after capture needs a new ``GraphedEncoder``; calls are
not thread-safe (one set of static buffers per budget). Outputs are inference tensors.

Without a CUDA device (or with ``capture=False``) nothing is captured and the same static-shape
forward runs eagerly on the padded buffers: the padding, budget and copy logic are those of the
graphs, which is how the CPU tests check them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .attention import select_backend
from .layers import VarlenContext
from .packing import PackedBatch, SegmentLayout, host_staging, item_token_counts
from .positions import RotaryTable

if TYPE_CHECKING:  # the models import this module (their automatic graphs): no import back at run time
    from .models.base import PackedVisionModel, PackedVisionOutput, PackMetadata

__all__ = [
    "DEFAULT_BUDGETS",
    "AUTO_BUDGETS",
    "AUTO_MAX_ITEMS",
    "padded_segment_lengths",
    "select_budget",
    "graph_backend",
    "StaticPack",
    "GraphedEncoder",
]

#: token budgets captured by default: packs of up to 4096 sequence tokens, at most 1.5x padding
DEFAULT_BUDGETS = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
#: the budgets and items per pack of ``model(batch)``'s automatic graphs (``model.cuda_graphs``): the
#: latency-bound packs, where launches cost more than the padding to a budget
AUTO_BUDGETS = (256, 384, 512, 768, 1024)
AUTO_MAX_ITEMS = 8
#: eager runs of the static forward on a side stream before each capture (kernel selection,
#: FlashAttention 4's compilation, cuBLAS workspaces)
WARMUP_RUNS = 3


def padded_segment_lengths(lengths: Sequence[int], budget: int, num_segments: int) -> list[int]:
    """Segment lengths of a pack padded to ``budget`` tokens in exactly ``num_segments`` segments.

    The pack's own ``lengths`` first, then one filler segment of the tokens left over and
    one-token filler segments up to ``num_segments``. ``ValueError`` when the pack does not fit
    (more segments than ``num_segments``, or fewer spare tokens than filler segments).
    """
    lengths = [int(n) for n in lengths]
    fillers, spare = num_segments - len(lengths), budget - sum(lengths)
    if fillers < 0 or spare < fillers or (fillers == 0 and spare != 0):
        raise ValueError(
            f"a pack of {sum(lengths)} tokens in {len(lengths)} segments does not fit a budget of {budget} tokens "
            f"in {num_segments} segments (each filler segment needs a token); choose a budget with select_budget"
        )
    if not fillers:
        return lengths
    return [*lengths, spare - (fillers - 1), *([1] * (fillers - 1))]


def select_budget(total: int, num_items: int, budgets: Sequence[int], max_items: int) -> int | None:
    """The smallest of the (sorted) ``budgets`` that a pack of ``total`` sequence tokens in
    ``num_items`` segments fits, with ``max_items + 1`` segment slots; ``None`` if none does."""
    if num_items > max_items:
        return None
    fillers = max_items + 1 - num_items
    return next((budget for budget in budgets if total + fillers <= budget), None)


def graph_backend(model: PackedVisionModel, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend the captured graphs run (the model's ``attention_backend``, the
    ``PACKVIT_ATTENTION`` environment variable, or the automatic choice); ``ValueError`` for one
    that cannot be captured."""
    name = select_backend(device, dtype, model.blocks[0].attn.head_dim, model.attention_backend)
    if name == "reference":
        raise ValueError(
            "the 'reference' attention backend reads segment boundaries on the host (a sync per call) and cannot "
            "run inside a CUDA graph; leave model.attention_backend unset (automatic) or name a varlen kernel: "
            "fa4, fa3, fa2, torch_varlen, aten_flash, or efficient for float32"
        )
    return name


class StaticPack:
    """The fixed-shape input and output of the block stack for one token budget.

    ``x [budget, D]``, ``cu_seqlens [num_segments + 1]`` (int32) and, for families with a rotary
    table, ``rotary`` over ``cos, sin [budget, hd]``: allocated once on the model's device and only
    ever written in place, so a captured graph reads each new pack from the same addresses.
    ``context`` is the attention metadata the blocks see: its host layout gives only the segment
    count and the total (the boundaries live in ``cu_seqlens``), and ``max_seqlen`` is the budget.
    """

    def __init__(self, model: PackedVisionModel, budget: int, num_segments: int, backend: str,
                 dtype: torch.dtype, rotary: RotaryTable | None):
        device = model.device
        self.budget, self.num_segments = budget, num_segments
        self.blocks = model.blocks
        self.x = torch.zeros(budget, model.hidden_size, device=device, dtype=dtype)
        # a valid layout before any pack is loaded: warm-up and capture run on it
        layout = SegmentLayout.from_lengths(padded_segment_lengths([1], budget, num_segments))
        self.cu_seqlens = layout.cu_seqlens_host.to(device, copy=True)
        #: [0, 1, ..., num_segments]: one query per segment, for the blocks (which never pool) and,
        #: its first N + 1 entries, for the eager pooling of a pack of N items
        self.pool_offsets = SegmentLayout.one_per_item(num_segments).cu_seqlens_host.to(device, copy=True)
        self.context = VarlenContext(layout, self.cu_seqlens, budget, self.pool_offsets, backend)
        self.rotary = None
        if rotary is not None:
            head_dim, table_dtype = rotary.cos.shape[1], rotary.cos.dtype
            cos = torch.ones(budget, head_dim, device=device, dtype=table_dtype)
            sin = torch.zeros(budget, head_dim, device=device, dtype=table_dtype)
            self.rotary = RotaryTable(cos, sin, rotary.pairing)
        #: the captured graph, or None (the static forward then runs eagerly)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._output: torch.Tensor | None = None

    def context_for(self, lengths: Sequence[int], backend: str | None) -> VarlenContext:
        """A pack's attention segments (its segment ``lengths``), padded to the budget into
        ``cu_seqlens`` by one non-blocking copy; returned as the pack's own ``VarlenContext`` on
        views of the static buffers (for ``model.prepare(batch, context=...)``; ``backend``: the
        model's, for the eager pooling). ``lengths`` must fit (``select_budget``)."""
        padded = padded_segment_lengths(lengths, self.budget, self.num_segments)
        cu_seqlens = np.zeros(self.num_segments + 1, dtype=np.int32)
        cu_seqlens[1:] = np.cumsum(padded)
        self.cu_seqlens.copy_(host_staging(torch.from_numpy(cu_seqlens), self.cu_seqlens.device), non_blocking=True)
        layout = SegmentLayout.from_lengths(lengths)
        count = layout.num_segments + 1
        return VarlenContext(layout, self.cu_seqlens[:count], layout.max_seqlen, self.pool_offsets[:count], backend)

    def load(self, x: torch.Tensor, meta: PackMetadata) -> None:
        """Copies a pack into the static buffers: its embedded sequence ``x [S, D]`` and its rotary
        rows; its segments are there already (``meta`` was prepared on ``context_for``). No host sync."""
        if meta.context.cu_seqlens.data_ptr() != self.cu_seqlens.data_ptr():
            raise ValueError(
                "the pack's metadata was not prepared on this budget's buffers: "
                "model.prepare(batch, context=pack.context_for(segment lengths, model.attention_backend))"
            )
        if (meta.rotary is None) != (self.rotary is None):
            raise ValueError("the pack's metadata and the static buffers disagree on a rotary table; build a new GraphedEncoder")
        total = x.shape[0]
        self.x[:total].copy_(x)
        if self.rotary is not None:
            self.rotary.cos[:total].copy_(meta.rotary.cos)
            self.rotary.sin[:total].copy_(meta.rotary.sin)

    def replay(self, x: torch.Tensor, meta: PackMetadata) -> torch.Tensor:
        """The block stack on a pack, as the template's ``blocks=`` hook: ``x [S, D]`` loaded, the
        graph replayed (or the static forward run), rows ``[:S]`` copied out → ``[S, D]``."""
        self.load(x, meta)
        return self.run()[: x.shape[0]].clone()  # a tensor of its own: the next replay overwrites the output

    def forward(self) -> torch.Tensor:
        """The blocks, eagerly, on the static buffers: ``[budget, D]``."""
        x = self.x
        for block in self.blocks:
            x = block(x, self.context, self.rotary)
        return x

    def capture(self, pool) -> None:
        """Warms the static forward up on a side stream, then captures it into ``graph``
        (allocations from the shared memory ``pool``)."""
        current = torch.cuda.current_stream(self.x.device)
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._output = self.forward()
        self.graph = graph

    def run(self) -> torch.Tensor:
        """The block stack's output for the loaded pack, ``[budget, D]``: the captured graph
        replayed (its static output tensor, overwritten by the next replay), or the static
        forward run eagerly."""
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self._output


class GraphedEncoder:
    """A packed model whose encoder blocks run as CUDA graphs captured per token budget.

    ``GraphedEncoder(model, budgets=DEFAULT_BUDGETS, max_items=8)`` captures one graph per budget
    (sequence tokens, prefix tokens included) for packs of up to ``max_items`` items, largest
    budget first, all sharing one memory pool; with ``lazy=True`` each budget is captured when a
    pack first needs it (``model(batch)``'s automatic graphs, ``model.cuda_graphs``).
    ``graphed(batch)`` returns what ``model(batch)`` returns for a ``PackedBatch``: a
    ``PackedVisionOutput`` with ``last_hidden_state``, ``pooler_output`` and ``prefix_tokens``.
    ``capture``: ``None`` captures on CUDA and runs the static-shape forward eagerly elsewhere;
    ``True`` requires CUDA; ``False`` never captures. ``fallback``: packs that fit no budget run
    through ``model(batch)`` (``True``) or raise ``ValueError`` (``False``). See the module
    documentation for the design and its limits.

    Sharing one pool, a replay may reuse the memory of another budget's static output: each call
    copies its rows out of its graph's output on the same stream before the next replay.
    """

    def __init__(self, model: PackedVisionModel, budgets: Sequence[int] = DEFAULT_BUDGETS, *, max_items: int = 8,
                 capture: bool | None = None, fallback: bool = True, lazy: bool = False):
        if not (isinstance(model, torch.nn.Module) and callable(getattr(model, "encode", None))
                and hasattr(model, "placeholder_grid")):
            raise ValueError(f"GraphedEncoder takes a packvit model (PackedVisionModel), got {type(model).__name__}")
        if model.compile_layers:
            raise ValueError(
                "GraphedEncoder captures eager encoder blocks and model.compile_layers is True; set it to None "
                "(automatic: eager inside the graphs) or False"
            )
        if getattr(model, "batch_invariant", False):
            raise ValueError(
                "GraphedEncoder captures the encoder blocks with the default kernels and model.batch_invariant is on; "
                "a batch-invariant model runs model(batch) eagerly (turn batch_invariant off to capture graphs)"
            )
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive integer (items per pack), got {max_items!r}")
        budgets = sorted(set(budgets))
        if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b <= max_items for b in budgets):
            raise ValueError(
                f"budgets must be integers above max_items ({max_items}): a budget holds a pack's tokens plus one "
                f"filler token per unused segment slot; got {budgets}"
            )
        device = model.device
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device and the model is on {device}; pass capture=False to "
                             f"run the static-shape forward eagerly")
        self.model, self.budgets, self.max_items, self.fallback = model, tuple(budgets), max_items, fallback
        #: calls that fit no budget and ran through model(batch)
        self.fallback_calls = 0
        with torch.inference_mode():
            # the smallest pack the model takes tells the activation dtype and whether it has a rotary table
            probe = model.prepare(model.placeholder_grid())
        self.device, self.dtype, self._rotary = probe.device, probe.dtype, probe.rotary
        if capture:
            backend = graph_backend(model, device, self.dtype)
        else:
            backend = select_backend(device, self.dtype, model.blocks[0].attn.head_dim, model.attention_backend)
        #: the attention backend of the static forward, fixed at construction
        self.backend = backend
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        #: the static buffers (and graph) of each budget made so far
        self.packs: dict[int, StaticPack] = {}
        if not lazy:
            for budget in reversed(self.budgets):
                self._static_pack(budget)

    def _static_pack(self, budget: int) -> StaticPack:
        """The budget's static buffers, made (and captured) on first use."""
        pack = self.packs.get(budget)
        if pack is None:
            with torch.no_grad():  # normal tensors: the buffers stay writable outside inference mode
                pack = StaticPack(self.model, budget, self.max_items + 1, self.backend, self.dtype, self._rotary)
            if self._pool is not None:
                with torch.inference_mode():
                    pack.capture(self._pool)
            self.packs[budget] = pack
        return pack

    @property
    def captured(self) -> bool:
        """Whether the budgets run as captured CUDA graphs (else the static forward runs eagerly)."""
        return self._pool is not None

    def budget_for(self, batch: PackedBatch) -> int | None:
        """The budget a pack runs in, or ``None`` when it fits none (then ``model(batch)`` serves it)."""
        counts = item_token_counts(batch.grid_thw)
        total = sum(counts) + len(counts) * self.model.num_prefix_tokens
        return select_budget(total, len(counts), self.budgets, self.max_items)

    def __call__(self, batch: PackedBatch) -> PackedVisionOutput:
        """Encodes a pack: ``PackedVisionOutput`` as ``model(batch)``, the blocks in the pack's budget."""
        if not isinstance(batch, PackedBatch):
            raise ValueError(f"GraphedEncoder takes a PackedBatch (the model's processor makes one), got {type(batch).__name__}")
        out = self.run(batch)
        if out is not None:
            return out
        if not self.fallback:
            raise ValueError(
                f"a pack of {batch.num_items} items and {sum(batch.token_counts)} patches fits no captured budget "
                f"(largest {self.budgets[-1]} tokens, at most {self.max_items} items); pass larger budgets or "
                f"max_items, split the pack, or build the GraphedEncoder with fallback=True"
            )
        self.fallback_calls += 1
        with torch.inference_mode():
            return self.model(batch)

    def run(self, batch: PackedBatch, *, pool: bool = True) -> PackedVisionOutput | None:
        """The pack through the model's template with the blocks replayed in its budget, or
        ``None`` when it fits no budget. ``pool=False``: no pooling head."""
        budget = self.budget_for(batch)
        if budget is None:
            return None
        model = self.model
        if model.device != self.device or model.activation_dtype != self.dtype:
            raise ValueError(
                f"the model now computes on {model.device} {model.activation_dtype} but was captured on {self.device} "
                f"{self.dtype}; build a new GraphedEncoder after moving or casting the model"
            )
        pack = self._static_pack(budget)
        lengths = [n + model.num_prefix_tokens for n in batch.token_counts]
        with torch.inference_mode():
            meta = model.prepare(batch, context=pack.context_for(lengths, model.attention_backend))
            return model.encode(batch, metadata=meta, pool=pool, blocks=pack.replay)
