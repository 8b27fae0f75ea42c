"""Reading image files: ``open_image(source)``, the one opener of the package.

``open_image`` takes a path or the bytes of a file and returns a fully decoded PIL image, upright
by its EXIF orientation tag (``PIL.ImageOps.exif_transpose``, as transformers' ``load_image``
turns it), in the mode the file stores (RGBA, LA, P, 16-bit grey ... are converted later, by the
processor). Every way a file can fail raises ``ImageReadError``, a ``ValueError`` whose ``status``
says which way, in the vocabulary of ``packvit embed``'s metadata rows, and whose message names
the file:

- ``unreadable``: the path does not exist, is a directory, or cannot be read;
- ``empty``: zero bytes, or an image of zero pixels;
- ``not_an_image``: no format Pillow reads;
- ``too_large``: more pixels than ``max_pixels``, or than Pillow's decompression-bomb limit;
- ``decode_error``: a truncated or corrupt file.

``draft`` (opt-in) decodes a JPEG far larger than it will be resized to at a reduced scale (the
decoder's DCT scaling, 1/2, 1/4 or 1/8 per side: ``PIL.Image.Image.draft``), which the caller
chooses from the image's size.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["READ_STATUSES", "DEFAULT_MAX_PIXELS", "DRAFT_SCALES", "ImageReadError", "open_image"]

#: the statuses of ``ImageReadError``
READ_STATUSES = ("unreadable", "empty", "not_an_image", "too_large", "decode_error")
#: images with more pixels are refused by default: Pillow's own decompression-bomb warning limit
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ORIENTATION = 0x0112
#: EXIF orientations that swap the stored width and height
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
#: the reductions per side a JPEG decoder's DCT scaling offers
DRAFT_SCALES = (1, 2, 4, 8)


class ImageReadError(ValueError):
    """An image file that cannot be read: ``status`` (one of ``READ_STATUSES``) and a message that
    names the file (``"image file 'NAME': why"``)."""

    def __init__(self, status: str, name: str, message: str):
        if status not in READ_STATUSES:
            raise ValueError(f"unknown image read status {status!r}; the statuses are {READ_STATUSES}")
        super().__init__(f"{name}: {message}")
        self.status = status


def _describe_source(source, name: str | None = None) -> str:
    """How errors name a file: ``image file 'NAME'`` (``name`` when given, else the path), or
    ``image file of N bytes``."""
    if name is not None:
        return f"image file {name!r}"
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    return f"image file of {len(source)} bytes"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a PNG's header declares, for files Pillow refuses to identify."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def _read_bytes(source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ImageReadError("unreadable", name, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError("unreadable", name, "is a directory, not an image file") from None
    except OSError as error:
        raise ImageReadError("unreadable", name, f"cannot be read ({_describe(error)})") from None


def _bomb_message(error: Image.DecompressionBombError) -> str:
    return (
        f"Pillow refuses to decode it as a possible decompression bomb ({error}); if you trust the file, raise "
        f"Pillow's limit before processing, PIL.Image.MAX_IMAGE_PIXELS (it refuses images of more than twice "
        f"that many pixels; None turns its check off), and pass max_pixels= of at least the image's pixel count"
    )


def open_image(source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft: Callable[[int, int], int] | None = None) -> Image.Image:
    """A path (``str`` or ``os.PathLike``) or a file's bytes → the fully decoded PIL image, upright.

    ``max_pixels``: images with more pixels are ``too_large`` (``None``: only Pillow's own
    decompression-bomb limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``). ``name``: how messages name
    the file (default: the path, or the byte count). ``draft``: for JPEGs, a function of the
    upright ``(height, width)`` giving the reduction to decode at, one of ``DRAFT_SCALES``; the
    image then has ``ceil(side / reduction)`` pixels per side (module docstring). Raises
    ``ImageReadError`` (module docstring).
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(f"open_image takes a path or a file's bytes, got {type(source).__name__}")
    name = _describe_source(source, name)
    data = _read_bytes(source, name)
    if not data:
        raise ImageReadError("empty", name, "the file has zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit that counts
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageReadError("too_large", name, _bomb_message(error)) from None
        except UnidentifiedImageError:
            declared = _png_header_size(data)
            if declared is not None and 0 in declared:
                raise ImageReadError("empty", name, f"a PNG of {declared[0]}x{declared[1]} pixels has no pixels") from None
            raise ImageReadError("not_an_image", name, f"not an image format Pillow reads (first bytes {data[:8]!r})") from None
        except Exception as error:  # Pillow's plugins raise many types for malformed headers
            raise ImageReadError("decode_error", name, f"cannot be decoded ({_describe(error)})") from None
        width, height = image.size
        if width == 0 or height == 0:
            raise ImageReadError("empty", name, f"the image is {width}x{height} pixels: it has no pixels")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageReadError(
                "too_large", name,
                f"{width}x{height} = {width * height} pixels, more than max_pixels={max_pixels}; pass a larger "
                f"max_pixels (or None) if you trust the file",
            )
        try:
            if draft is not None and image.format == "JPEG":  # a JPEG's EXIF block precedes its pixels
                transposed = image.getexif().get(_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS
                scale = draft(*((width, height) if transposed else (height, width)))
                if scale not in DRAFT_SCALES:
                    raise ValueError(f"a JPEG decodes at a reduction of {DRAFT_SCALES}, not {scale!r}")
                if scale > 1:  # Pillow picks the largest reduction that keeps the size asked for
                    image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except Image.DecompressionBombError as error:
            raise ImageReadError("too_large", name, _bomb_message(error)) from None
        except Exception as error:
            raise ImageReadError("decode_error", name, f"cannot be decoded ({_describe(error)})") from None
    return image
