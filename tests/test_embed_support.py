"""What the ``packvit embed`` tests share: a random checkpoint, a folder of good and bad images,
reading an output folder back, the model called directly on one image, and PIL standing in for
nvJPEG (no tests here)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import packvit

#: a patch budget small enough for fast CPU runs, large enough for many grid shapes
MAX_NUM_PATCHES = 48
GOOD = ("astronaut.jpg", "wide.png", "tall.webp", "gray.png", "gray_alpha.png", "palette.gif", "palette_alpha.png",
        "rgba.png", "cmyk.jpg", "bilevel.bmp", "sixteen_bit.png", "one_pixel.png", "exif_rotated.jpg",
        "nested/deeper/coffee.jpeg", "nested/UPPER.JPG")
BAD = {"corrupt.png": "decode_error", "truncated.jpg": "decode_error", "not_an_image.jpg": "not_an_image",
       "zero_bytes.jpg": "empty", "photo.heic": "unsupported", "dangling.jpg": "unreadable", "huge.png": "too_large",
       "float.tif": "preprocess_error"}
#: the bad files a folder run reads: in a folder only image and video files are inputs
FOLDER_BAD = {name: status for name, status in BAD.items() if name != "photo.heic"}


def random_checkpoint(root: Path, family: str = "siglip2", size: str = "tiny") -> Path:
    """A random checkpoint of ``family`` written by the harness into ``root`` (the test skips where
    the installed transformers lacks the family's reference)."""
    pytest.importorskip("transformers")
    from packvit.harness import get_adapter

    try:
        return Path(get_adapter(family).write_random_checkpoint(root, size=size))
    except ValueError as error:  # the harness names the transformers release the reference needs
        pytest.skip(str(error))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (its pixel data is one tiny row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def write_image_folder(root: Path, with_bad: bool = True) -> Path:
    """Good images of many sizes and modes (``GOOD``) and, with ``with_bad``, the bad files of ``BAD``."""
    pytest.importorskip("skimage")
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    astronaut, chelsea, coffee, camera = (_photo(name) for name in ("astronaut", "chelsea", "coffee", "camera"))
    Image.fromarray(astronaut).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(chelsea[100:140]).save(root / "wide.png")  # 40 x 451
    Image.fromarray(coffee[:, 200:230]).save(root / "tall.webp")  # 400 x 30
    Image.fromarray(camera[::2, ::2]).save(root / "gray.png")
    Image.fromarray(camera[:100, :120]).convert("LA").save(root / "gray_alpha.png")
    Image.fromarray(chelsea).convert("P").save(root / "palette.gif")
    palette = Image.fromarray(coffee[:90, :160]).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "palette_alpha.png", transparency=0)
    rgba = np.dstack([astronaut[:200, :150], np.linspace(0, 255, 150, dtype=np.uint8)[None].repeat(200, 0)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(coffee[:120, :200]).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(camera[:64, :96]).convert("1").save(root / "bilevel.bmp")
    Image.fromarray((camera[:70, :50].astype(np.uint16) * 257)).save(root / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 30, 90)).save(root / "one_pixel.png")
    rotated = Image.fromarray(chelsea[:60, :150])
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    Image.fromarray(coffee).save(root / "nested" / "deeper" / "coffee.jpeg")
    Image.fromarray(astronaut[::4, ::3]).save(root / "nested" / "UPPER.JPG", format="JPEG")
    (root / ".hidden.jpg").write_bytes((root / "astronaut.jpg").read_bytes())  # hidden files are not inputs
    if with_bad:
        png = io.BytesIO()
        Image.fromarray(astronaut[:64, :64]).save(png, format="PNG")
        corrupt = bytearray(png.getvalue())
        start = corrupt.index(b"IDAT") + 40
        corrupt[start: start + 200] = bytes(200)
        (root / "corrupt.png").write_bytes(bytes(corrupt))
        jpeg = (root / "astronaut.jpg").read_bytes()
        (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (root / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
        (root / "zero_bytes.jpg").write_bytes(b"")
        (root / "photo.heic").write_bytes(jpeg)
        os.symlink(root / "no_such_file.jpg", root / "dangling.jpg")
        (root / "huge.png").write_bytes(_png_with_size(30_000, 20_000))
        Image.fromarray(camera[:40, :40].astype(np.float32) / 255).save(root / "float.tif")  # mode F: refused
    return root


def read_output(directory: Path) -> tuple[list[dict], np.ndarray]:
    """All metadata rows (``shard`` added) and embeddings of an output folder, shard after shard;
    checks that each npy and parquet pair has the same number of rows."""
    import pyarrow.parquet as parquet

    rows, embeddings = [], []
    metadata_files = sorted((directory / "metadata").glob("metadata_*.parquet"))
    embedding_files = sorted((directory / "img_emb").glob("img_emb_*.npy"))
    assert [f.stem.split("_")[-1] for f in metadata_files] == [f.stem.split("_")[-1] for f in embedding_files]
    for metadata_file, embedding_file in zip(metadata_files, embedding_files):
        shard_rows = parquet.read_table(metadata_file).to_pylist()
        array = np.load(embedding_file)
        assert array.shape[0] == len(shard_rows), metadata_file
        rows.extend(dict(row, shard=metadata_file.stem.split("_")[-1]) for row in shard_rows)
        embeddings.append(array)
    return rows, np.concatenate(embeddings) if embeddings else np.zeros((0, 0))


def preprocess_alone(checkpoint: Path, image, max_num_patches: int = MAX_NUM_PATCHES):
    """The checkpoint's own processor on one image: a file (a path or its bytes, which the processor
    opens, upright, transparency by the reference's rule for files) or an image in memory (PIL)."""
    image = str(image) if isinstance(image, Path) else image
    return packvit.load_processor(str(checkpoint))(images=[image], max_num_patches=max_num_patches, native=True)


@torch.inference_mode()
def embed_alone(model, checkpoint: Path, image, max_num_patches: int = MAX_NUM_PATCHES, **forward):
    """The model called directly on one image: ``(output, batch)``."""
    batch = preprocess_alone(checkpoint, image, max_num_patches)
    return model(batch, **forward), batch


def pil_stand_in(files: list[torch.Tensor], device=None) -> list[torch.Tensor]:
    """nvJPEG's part played by PIL (``gpu_decode.nvjpeg_decode``'s signature): JPEG files, uint8
    ``[bytes]`` → uint8 RGB ``[3, H, W]`` as stored (no EXIF orientation applied, as nvJPEG applies
    none); raises for the whole batch where one file fails, as nvJPEG does."""
    decoded = []
    for file in files:
        with Image.open(io.BytesIO(file.numpy().tobytes())) as image:
            decoded.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    return decoded
