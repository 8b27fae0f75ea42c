"""The decode stage: one input's name and data → ``Decoded``, what the preprocess stage takes.

The media kind comes from the name's extension (``media_kind``). An image stays its file (a path
or the bytes of a tar member): the processor opens it (``packvit.preprocess.open_image``, the
package's one opener: fully decoded, upright by its EXIF orientation), so a file is read as the
reference reads a file, transparency included. On the GPU route (``DecodeOptions.gpu``) a JPEG
nvJPEG can take becomes its bytes and parsed header instead (``gpu_decode.read_jpeg``), decoded in
the main process. A video becomes its sampled frames (PyAV).

Every way an input can fail raises ``InputError(status, message)``, whose ``status`` is what the
metadata row records: ``unreadable``, ``empty``, ``unsupported``, ``not_an_image``, ``too_large``,
``decode_error`` (an image's from the opener's ``ImageReadError``; and, from the reader,
``no_image``; from preprocessing, ``preprocess_error``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .._optional import require
from ..preprocess.reading import DEFAULT_MAX_PIXELS
from .gpu_decode import JpegFile, read_jpeg

__all__ = [
    "STATUSES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "media_kind",
    "InputError",
    "DecodeOptions",
    "Decoded",
    "decode",
    "require_av",
    "decode_video",
    "sample_frame_indices",
]

STATUSES = ("ok", "unreadable", "empty", "unsupported", "no_image", "not_an_image", "too_large", "decode_error",
            "preprocess_error")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})


def media_kind(name: str) -> str | None:
    """``"image"``, ``"video"`` or ``None`` (unsupported) from a file name's extension (or from an
    extension alone, such as a WebDataset member's ``".jpg"``)."""
    base = os.path.basename(name)
    suffix = "." + base.rsplit(".", 1)[1].lower() if "." in base else ""
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


class InputError(Exception):
    """An input that cannot be embedded: ``status`` (one of ``STATUSES``) and a message saying why."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DecodeOptions:
    """``max_pixels``: larger images are ``too_large``; ``num_frames`` sampled per video;
    ``video_as_item``: a video is one item (a model that takes videos) rather than its frames as
    items; ``gpu``: JPEGs nvJPEG can take go to the main process's GPU decode."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    num_frames: int = 16
    video_as_item: bool = False
    gpu: bool = False


@dataclass
class Decoded:
    """A decoded input, one of: ``file``, an image file (its path or bytes) for the processor to
    open; ``jpeg``, a JPEG of the GPU route; ``images``, a video's sampled frames (``frame_indices``
    saying which); ``clip``, a video's sampled frames as one item."""

    file: str | bytes | None = None
    jpeg: JpegFile | None = None
    images: list[Image.Image] | None = None
    frame_indices: list[int] | None = None
    clip: list[Image.Image] | None = None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def require_av():
    """PyAV, or an ``ImportError`` that names the extra to install."""
    return require("av", "video", "reading video files")


def _unsupported(name: str) -> InputError:
    extension = os.path.splitext(name)[1] or "(none)"
    return InputError("unsupported", f"extension {extension} is not an image ({' '.join(sorted(IMAGE_EXTENSIONS))}) "
                                     f"or a video ({' '.join(sorted(VIDEO_EXTENSIONS))})")


def decode(name: str, data: str | bytes, options: DecodeOptions = DecodeOptions()) -> Decoded:
    """An input → ``Decoded``; ``name`` gives its media kind by extension, ``data`` is a path to read
    or the input's bytes. Raises ``InputError``."""
    kind = media_kind(name)
    if kind is None:
        raise _unsupported(name)
    if kind == "image":
        jpeg = read_jpeg(data, options.max_pixels) if options.gpu else None
        return Decoded(jpeg=jpeg) if jpeg is not None else Decoded(file=data)
    try:
        frames, indices, _ = decode_video(data, options.num_frames)
    except ImportError as error:
        raise InputError("unsupported", str(error)) from None
    return Decoded(clip=frames) if options.video_as_item else Decoded(images=frames, frame_indices=indices)


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly from the first frame to the last (all frames when fewer)."""
    if total_frames <= num_frames:
        return list(range(total_frames))
    return sorted(set(np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()))


def decode_video(source: str | bytes, num_frames: int) -> tuple[list[Image.Image], list[int], int]:
    """A video file (path or bytes) → ``(frames, frame_indices, total_frames)``: ``num_frames`` RGB
    frames sampled evenly over the clip."""
    av = require_av()
    if isinstance(source, bytes) and not source:
        raise InputError("empty", "zero bytes")
    if isinstance(source, str) and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise InputError("empty", "the file has zero bytes")
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as error:
        raise InputError("unreadable", _describe(error)) from None
    except Exception as error:
        raise InputError("decode_error", f"not a video PyAV reads ({_describe(error)})") from None
    with container:
        if not container.streams.video:
            raise InputError("decode_error", "the file holds no video stream")
        stream = container.streams.video[0]
        try:
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if not stream.frames:
                container.seek(0)
            if total == 0:
                raise InputError("decode_error", "the video stream has no frames")
            wanted = set(sample_frame_indices(total, num_frames))
            last_wanted, frames, indices = max(wanted), [], []
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames.append(frame.to_image())
                    indices.append(index)
                if index >= last_wanted:
                    break
        except InputError:
            raise
        except Exception as error:
            raise InputError("decode_error", _describe(error)) from None
    if not frames:
        raise InputError("decode_error", "no frame could be decoded")
    return frames, indices, max(total, indices[-1] + 1)
