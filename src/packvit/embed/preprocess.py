"""The preprocess stage: a decoded input → its rows and packed items, by the checkpoint's processor.

``ProcessorSpec`` is the picklable recipe each DataLoader worker builds its processor from
(``packvit.preprocess.load_processor`` with the run's settings); ``preprocess`` runs it on one
decoded input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..packing import PackedBatch
from ..preprocess import load_processor
from .decode import Decoded, InputError
from .packer import InputResult
from .sources import SourceInput

__all__ = ["ProcessorSpec", "preprocess"]


@dataclass(frozen=True)
class ProcessorSpec:
    """How to build a checkpoint's processor: ``native`` processing (aspect kept) or the published
    fixed-size one, at most ``max_num_patches`` patches (``None``: the checkpoint's or the family's own cap)."""

    checkpoint: str
    family: str
    native: bool = True
    max_num_patches: int | None = None

    def build(self):
        """The processor, these settings its defaults: ``processor(images=None, videos=None) -> PackedBatch``."""
        cap = {} if self.max_num_patches is None else {"max_num_patches": self.max_num_patches}  # None: the checkpoint's
        return load_processor(self.checkpoint, native=self.native, **cap)

    def settings(self) -> dict:
        """The processor as it runs: its class and every resolved setting (``vars``: the cap it
        applies, not the ``None`` asked for)."""
        processor = self.build()
        return {"class": type(processor).__name__, **vars(processor)}

    def probe(self) -> PackedBatch:
        """The processor built and run on one small grey image; ``ValueError`` where the family's
        processor refuses these settings."""
        from PIL import Image

        try:
            return self.build()(images=[Image.new("RGB", (64, 64), (128, 128, 128))])
        except ValueError as error:
            hint = "" if not self.native else "; pass --fixed for the published fixed-size processor"
            raise ValueError(f"the {self.family} processor of {self.checkpoint} refuses these settings ({error}){hint}") from error


def preprocess(source: SourceInput, decoded: Decoded, processor) -> tuple[InputResult, PackedBatch]:
    """A decoded input → its result (one row per item: a video's frames as images give one row each,
    with their frame index) and its items, one per row; ``InputError("preprocess_error")`` where the
    processor refuses it."""
    row = source.row
    if decoded.frame_indices is not None:
        rows = [replace(row, frame=index) for index in decoded.frame_indices]
    else:
        rows = [row]
    try:
        items = processor(images=decoded.images) if decoded.clip is None else processor(videos=[decoded.clip])
    except Exception as error:  # a processor refuses an item it cannot resize (too small, ...)
        raise InputError("preprocess_error", f"{type(error).__name__}: {error}") from None
    for item_row, grid in zip(rows, items.grid_thw.tolist()):
        item_row.grid = tuple(grid)
    return InputResult(source.task, source.input_index, rows), items
