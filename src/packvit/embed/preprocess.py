"""The preprocess stage: a decoded input → its rows and items, by the checkpoint's processor.

``ProcessorSpec`` is the picklable recipe each DataLoader worker builds its processor from
(``packvit.preprocess.load_processor`` with the run's settings); ``preprocess`` runs its first
stage on one decoded input: ``processor.resize`` → a uint8 ``PixelBatch``, normalised later, in
the main process, on the model's device (``model.Encoder``). A JPEG of the GPU route is not
decoded here: its upright size gives its grid (``processor.device_grid``), and the file itself is
its item.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..packing import PackedBatch
from ..preprocess import ImageReadError, PixelBatch, load_processor
from ..preprocess.reading import DEFAULT_MAX_PIXELS
from .decode import Decoded, InputError
from .gpu_decode import JpegFile
from .packer import InputResult
from .sources import SourceInput

__all__ = ["ProcessorSpec", "preprocess"]


@dataclass(frozen=True)
class ProcessorSpec:
    """How to build a checkpoint's processor: ``native`` processing (aspect kept) or the published
    fixed-size one, at most ``max_num_patches`` patches (``None``: the checkpoint's or the family's
    own cap); image files of more than ``max_pixels`` pixels refused; ``jpeg_draft`` (``None``: off)
    its reduced JPEG decoding."""

    checkpoint: str
    family: str
    native: bool = True
    max_num_patches: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    jpeg_draft: float | None = None

    def build(self):
        """The processor, these settings its defaults (``packvit.preprocess.Processor``)."""
        cap = {} if self.max_num_patches is None else {"max_num_patches": self.max_num_patches}  # None: the checkpoint's
        return load_processor(self.checkpoint, native=self.native, max_pixels=self.max_pixels,
                              jpeg_draft=self.jpeg_draft, **cap)

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


def _resize(processor, **inputs) -> PixelBatch:
    """``processor.resize(**inputs)``; the opener's failures keep their status, what the processor
    refuses (too small, a mode it cannot convert ...) is ``preprocess_error``."""
    try:
        return processor.resize(**inputs)
    except ImageReadError as error:
        raise InputError(error.status, str(error)) from None
    except Exception as error:
        raise InputError("preprocess_error", f"{type(error).__name__}: {error}") from None


def preprocess(source: SourceInput, decoded: Decoded, processor) -> tuple[InputResult, PixelBatch | JpegFile]:
    """A decoded input → its result (one row per item: a video's frames as images give one row each,
    with their frame index) and its items: a ``PixelBatch`` of one item per row, or the ``JpegFile``
    of a GPU-route image. Raises ``InputError``."""
    row = source.row
    if decoded.jpeg is not None:
        try:
            row.grid = processor.device_grid(*decoded.jpeg.header.upright_size)
            return InputResult(source.task, source.input_index, [row]), decoded.jpeg
        except ValueError:  # a size the processor refuses: the CPU route says why
            decoded = Decoded(file=decoded.jpeg.path or decoded.jpeg.data)
    if decoded.file is not None:
        rows, items = [row], _resize(processor, images=[decoded.file])
    elif decoded.clip is not None:
        rows, items = [row], _resize(processor, videos=[decoded.clip])
    else:
        rows, items = [replace(row, frame=index) for index in decoded.frame_indices], _resize(processor, images=decoded.images)
    for item_row, grid in zip(rows, items.grid_thw.tolist()):
        item_row.grid = tuple(grid)
    return InputResult(source.task, source.input_index, rows), items
