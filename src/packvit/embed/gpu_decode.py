"""The GPU route of ``--decode gpu``: JPEGs decoded by nvJPEG in the main process, in one batch per pack.

In the workers (``read_jpeg``), each image file's header is parsed on the CPU: its stored size,
its EXIF orientation and its kind. A baseline JPEG of 8-bit YCbCr or grey, with an end-of-image
marker and within ``max_pixels``, takes the GPU route: its upright size gives its patch grid, so it
is packed by the token budget like any other item, and its bytes travel to the main process
(``JpegFiles``: every file of a pack in one uint8 buffer). Every other file (PNG, WebP ...,
progressive, CMYK or RGB-coded JPEGs, a truncated one, a header that cannot be read, an
orientation kept in XMP) takes the CPU route in the worker, the reference path, file by file.

In the main process (``JpegDecoder``) a pack's JPEGs are decoded on the device in one call of
``torchvision.io.decode_jpeg(files, device=..., mode=RGB)`` (torchvision imported here only, on
this path), each turned upright by its EXIF orientation on the device (``upright``: the flips
and transposes of ``PIL.ImageOps.exif_transpose``; nvJPEG applies none). A batch nvJPEG refuses
is decoded file by file; a file it refuses, or decodes to another size than its header says, is
decoded by the CPU opener (``packvit.preprocess.open_image``), and where that fails too its row
gets the status and message the CPU route gives it: no input is lost.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image

from ..preprocess import ImageReadError, open_image
from ..preprocess.common import to_rgb_uint8
from .layout import Row

__all__ = ["ORIENTATIONS", "JpegHeader", "JpegFile", "JpegFiles", "read_header", "read_jpeg", "exif_orientation",
           "upright", "nvjpeg_decode", "gpu_decode_unavailable", "JpegDecoder"]

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_BASELINE = 0xC0
#: start-of-frame markers of the other JPEG processes (extended, progressive, lossless, hierarchical, arithmetic)
_OTHER_FRAMES = frozenset(range(0xC1, 0xD0)) - {0xC4, 0xC8, 0xCC}
_START_OF_SCAN = 0xDA
#: markers without a length (a second start of image, the restarts, end of image, TEM): not in a
#: header the GPU route takes
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
_EXIF = b"Exif\0\0"
_XMP = b"http://ns.adobe.com/xap/1.0/\0"
_ORIENTATION_TAG = 0x0112
#: EXIF orientation → (transpose first, then flip these dims of [C, H, W]): ``PIL.ImageOps.exif_transpose``'s
#: FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90
ORIENTATIONS: dict[int, tuple[bool, tuple[int, ...]]] = {
    1: (False, ()), 2: (False, (-1,)), 3: (False, (-2, -1)), 4: (False, (-2,)),
    5: (True, ()), 6: (True, (-1,)), 7: (True, (-2, -1)), 8: (True, (-2,)),
}


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header says: its stored ``height`` and ``width``, its EXIF ``orientation``
    (1 when it has none) and its colour ``components`` (1 grey, 3 YCbCr)."""

    height: int
    width: int
    orientation: int = 1
    components: int = 3

    @property
    def upright_size(self) -> tuple[int, int]:
        """(height, width) once turned upright: swapped by the orientations that transpose."""
        transposed = ORIENTATIONS.get(self.orientation, (False,))[0]
        return (self.width, self.height) if transposed else (self.height, self.width)


def _u16(data: bytes, at: int, order: str = "big") -> int:
    return int.from_bytes(data[at: at + 2], order)


def exif_orientation(exif: bytes) -> int | None:
    """The orientation tag of an EXIF block's first IFD (the APP1 payload after ``Exif\\0\\0``): 1
    when it has none, ``None`` when the block cannot be read. Values outside 1..8 are returned as
    they are (PIL's ``exif_transpose`` leaves such an image as it is; so does ``upright``)."""
    if len(exif) < 8 or exif[:2] not in (b"II", b"MM"):
        return None
    order = "little" if exif[:2] == b"II" else "big"
    if _u16(exif, 2, order) != 42:
        return None
    ifd = int.from_bytes(exif[4:8], order)
    if ifd + 2 > len(exif):
        return None
    count = _u16(exif, ifd, order)
    if ifd + 2 + 12 * count > len(exif):
        return None
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if _u16(exif, entry, order) != _ORIENTATION_TAG:
            continue
        kind, values = _u16(exif, entry + 2, order), int.from_bytes(exif[entry + 4: entry + 8], order)
        if values != 1 or kind not in (3, 4):  # one SHORT or LONG
            return None
        return _u16(exif, entry + 8, order) if kind == 3 else int.from_bytes(exif[entry + 8: entry + 12], order)
    return 1


def read_header(data: bytes, max_pixels: int | None) -> JpegHeader | None:
    """The header of a JPEG the GPU route takes (module docstring), or ``None`` for any other file:
    those are decoded on the CPU, whose opener gives every status."""
    if data[:2] != _SOI or data[-2:] != _EOI:
        return None
    position, frame, exif, adobe_transform = 2, None, [], None
    while True:
        if position + 4 > len(data) or data[position] != 0xFF:
            return None
        while data[position + 1] == 0xFF:  # fill bytes before a marker
            position += 1
            if position + 4 > len(data):
                return None
        marker, length = data[position + 1], _u16(data, position + 2)
        if marker in _STANDALONE:
            return None
        segment = data[position + 4: position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        position += 2 + length
        if marker == 0xE1 and segment.startswith(_EXIF):
            exif.append(segment[len(_EXIF):])
        elif marker == 0xE1 and segment.startswith(_XMP) and b"tiff:Orientation" in segment:
            return None  # Pillow reads an orientation there too
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) > 11:
            adobe_transform = segment[11]
        elif marker in _OTHER_FRAMES:
            return None
        elif marker == _BASELINE:
            if len(segment) < 6 or frame is not None:
                return None
            frame = segment
        elif marker == _START_OF_SCAN:
            break
    if frame is None or frame[0] != 8 or frame[5] not in (1, 3) or len(frame) < 6 + 3 * frame[5]:
        return None
    height, width, components = _u16(frame, 1), _u16(frame, 3), frame[5]
    if components == 3 and (adobe_transform == 0 or frame[6::3][:3] == b"RGB"):
        return None  # RGB-coded, not YCbCr
    too_large = any(limit is not None and height * width > limit for limit in (max_pixels, Image.MAX_IMAGE_PIXELS))
    if height == 0 or width == 0 or too_large or len(exif) > 1:
        return None
    orientation = exif_orientation(exif[0]) if exif else 1
    if orientation is None:
        return None
    return JpegHeader(height, width, orientation, components)


@dataclass
class JpegFile:
    """One file of the GPU route: its bytes, its header, and its ``path`` (``None`` for a tar
    member), which the CPU opener's messages name."""

    data: bytes
    header: JpegHeader
    path: str | None = None


def read_jpeg(data: str | bytes, max_pixels: int | None) -> JpegFile | None:
    """An image file (a path or its bytes) → its ``JpegFile``, or ``None`` where it takes the CPU
    route (a file that cannot be read included: the CPU opener says why)."""
    path = data if isinstance(data, str) else None
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            return None
    header = read_header(data, max_pixels)
    return JpegFile(data, header, path) if header is not None else None


@dataclass
class JpegFiles:
    """A pack's JPEG files: their bytes one after another in ``data`` (uint8 ``[total bytes]``, one
    shared-memory block on its way from a worker), file ``i`` at ``offsets[i]:offsets[i + 1]``,
    with its header and path."""

    data: torch.Tensor
    offsets: list[int]
    headers: list[JpegHeader]
    paths: list[str | None]

    @classmethod
    def join(cls, files: Sequence[JpegFile]) -> "JpegFiles":
        offsets = [0]
        for file in files:
            offsets.append(offsets[-1] + len(file.data))
        data = torch.frombuffer(bytearray().join(file.data for file in files), dtype=torch.uint8)
        return cls(data, offsets, [file.header for file in files], [file.path for file in files])

    def __len__(self) -> int:
        return len(self.headers)

    def file(self, index: int) -> torch.Tensor:
        """File ``index``'s bytes, uint8 ``[bytes]`` (a view)."""
        return self.data[self.offsets[index]: self.offsets[index + 1]]


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image [C, H, W]`` as ``PIL.ImageOps.exif_transpose`` turns an image of that EXIF
    ``orientation`` (unknown values: as it is); ``[C, W, H]`` for 5 to 8."""
    transpose, dims = ORIENTATIONS.get(orientation, (False, ()))
    if transpose:
        image = image.transpose(-2, -1)
    return image.flip(dims) if dims else image


def nvjpeg_decode(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files (uint8 ``[bytes]`` on the CPU) → uint8 RGB ``[3, H, W]`` on ``device``, by nvJPEG
    in one batch (``torchvision.io.decode_jpeg``)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def _probe_jpeg() -> torch.Tensor:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 40, 90)).save(buffer, format="JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def gpu_decode_unavailable(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` here (``None`` when they can): it is not a CUDA
    device, torchvision is not installed, or its nvJPEG decode fails on a small JPEG."""
    if device.type != "cuda":
        return f"the device is {device}, not a CUDA device"
    try:
        import torchvision
    except ImportError:
        return ("torchvision is not installed (the GPU route decodes with torchvision.io.decode_jpeg on nvJPEG; "
                "install the torchvision build that matches this torch)")
    try:
        decoded = nvjpeg_decode([_probe_jpeg()], device)
    except Exception as error:  # not built with nvJPEG, no nvJPEG library, a device it cannot use
        return f"torchvision {torchvision.__version__} cannot decode JPEGs on {device} ({type(error).__name__}: {error})"
    if tuple(decoded[0].shape) != (3, 16, 24):
        return f"torchvision {torchvision.__version__}'s decode_jpeg on {device} gave {tuple(decoded[0].shape)} for a 24x16 JPEG"
    return None


class JpegDecoder:
    """The main process's half of the GPU route (module docstring): ``decoder(jpegs, rows)`` → the
    upright uint8 RGB ``[3, H, W]`` images on ``device`` of the files that decode, in order; the
    row of a file that decodes nowhere becomes a failed row. ``decode_batch(files)`` decodes a list
    of files on the device (default nvJPEG; a stand-in elsewhere), raising where it cannot."""

    def __init__(self, device: torch.device, decode_batch: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None):
        self.device = torch.device(device)
        self.decode_batch = decode_batch or functools.partial(nvjpeg_decode, device=self.device)
        #: files decoded on the device, and by the CPU opener because the device decode refused them
        self.decoded, self.cpu_fallbacks = 0, 0

    def _decode_each(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        decoded = []
        for file in files:
            try:
                decoded.append(self.decode_batch([file])[0])
            except Exception:  # this file is the one the batch failed on
                decoded.append(None)
        return decoded

    def __call__(self, jpegs: JpegFiles, rows: Sequence[Row]) -> list[torch.Tensor]:
        files = [jpegs.file(index) for index in range(len(jpegs))]
        try:
            decoded = self.decode_batch(files)
        except Exception:  # nvJPEG returns nothing when one file fails: decode them one by one
            decoded = self._decode_each(files)
        images = []
        for index, (image, header, row) in enumerate(zip(decoded, jpegs.headers, rows)):
            if image is not None and tuple(image.shape[-2:]) == (header.height, header.width):
                images.append(upright(image, header.orientation))
                self.decoded += 1
                continue
            self.cpu_fallbacks += 1
            try:  # the CPU opener, upright, with its statuses and messages; a JPEG has no transparency to differ
                opened = open_image(files[index].numpy().tobytes(), max_pixels=None, name=jpegs.paths[index])
                images.append(to_rgb_uint8(opened, "pil").to(self.device))
            except ImageReadError as error:
                row.status, row.error, row.grid = error.status, str(error), (0, 0, 0)
            except Exception as error:  # what the processor refuses on the CPU route
                row.status, row.error, row.grid = "preprocess_error", f"{type(error).__name__}: {error}", (0, 0, 0)
        return images
