"""``packvit embed --decode gpu`` on the CPU: everything but the nvJPEG call, with PIL standing in
for it. The header parse, the routing (which files go to the GPU, which to the CPU workers), the
EXIF orientation against Pillow's, the fallback of files the device decoder refuses, and the rows
and statuses against the CPU route."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from packvit.embed import embed, gpu_decode, run
from packvit.embed.cli import main as embed_main
from packvit.embed.gpu_decode import JpegDecoder, JpegFile, JpegFiles, JpegHeader, read_header, upright
from packvit.embed.layout import Row
from packvit.preprocess.aimv2 import AIMv2Processor
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.siglip2 import Siglip2Processor
from test_embed_support import MAX_NUM_PATCHES, pil_stand_in, random_checkpoint, read_output, write_image_folder

pytest.importorskip("pyarrow")
skimage_data = pytest.importorskip("skimage.data")
RUN = dict(max_num_patches=MAX_NUM_PATCHES, dtype="float32", normalize=False, workers=0, quiet=True)


def _jpeg(pixels: np.ndarray, orientation: int | None = None, **save) -> bytes:
    image = Image.fromarray(pixels)
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        save["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _without_segment(data: bytes, marker: int) -> bytes:
    """A JPEG with every segment of ``marker`` removed (its header still parses)."""
    kept, position = bytearray(data[:2]), 2
    while data[position + 1] != 0xDA:
        length = int.from_bytes(data[position + 2: position + 4], "big")
        if data[position + 1] != marker:
            kept += data[position: position + 2 + length]
        position += 2 + length
    return bytes(kept + data[position:])


@pytest.fixture
def stand_in(monkeypatch):
    """The GPU route available on the CPU, PIL decoding for nvJPEG; records the files it was given."""
    calls = []

    def decode(files, device=None):
        calls.append(len(files))
        return pil_stand_in(files)

    monkeypatch.setattr(run, "gpu_decode_unavailable", lambda device: None)
    monkeypatch.setattr(gpu_decode, "nvjpeg_decode", decode)
    return calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The embed test folder, with JPEGs of every orientation, a progressive and a grey one, and one
    whose header parses but whose data no decoder reads (no quantisation table)."""
    root = write_image_folder(tmp_path_factory.mktemp("images"))
    photo = skimage_data.chelsea()[:90, :140]
    for orientation in range(1, 9):
        (root / f"oriented_{orientation}.jpg").write_bytes(_jpeg(photo, orientation))
    (root / "progressive.jpg").write_bytes(_jpeg(photo, progressive=True))
    (root / "grey.jpg").write_bytes(_jpeg(skimage_data.camera()[::4, ::3]))
    (root / "no_tables.jpg").write_bytes(_without_segment(_jpeg(photo), 0xDB))
    return root


#: the files of ``images`` the GPU route takes: baseline JPEGs that decode on the device
GPU_FILES = {"astronaut.jpg", "exif_rotated.jpg", "nested/deeper/coffee.jpeg", "nested/UPPER.JPG", "grey.jpg",
             *(f"oriented_{orientation}.jpg" for orientation in range(1, 9))}


def test_the_header_gives_the_stored_size_the_orientation_and_the_route():
    photo = skimage_data.astronaut()[:120, :200]
    assert read_header(_jpeg(photo), None) == JpegHeader(120, 200, 1, 3)
    assert read_header(_jpeg(skimage_data.camera()[:50, :70]), None) == JpegHeader(50, 70, 1, 1)
    for orientation in range(1, 9):
        data = _jpeg(photo, orientation)
        header = read_header(data, None)
        with Image.open(io.BytesIO(data)) as image:
            assert header.orientation == orientation and header.upright_size == ImageOps.exif_transpose(image).size[::-1]
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG")
    xmp = _jpeg(photo, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    not_for_the_gpu = {
        "progressive": _jpeg(photo, progressive=True), "CMYK": cmyk.getvalue(), "RGB-coded": _jpeg(photo, keep_rgb=True),
        "PNG": png.getvalue(), "truncated": _jpeg(photo)[:-400], "empty": b"", "orientation in XMP": xmp,
        "a broken EXIF block": _jpeg(photo, 6).replace(b"Exif\0\0MM", b"Exif\0\0XX").replace(b"Exif\0\0II", b"Exif\0\0XX"),
        "a marker without a length": _jpeg(photo)[:2] + b"\xff\xd8" + _jpeg(photo)[2:],
    }
    for kind, data in not_for_the_gpu.items():
        assert read_header(data, None) is None, kind
    assert read_header(_jpeg(photo), max_pixels=120 * 200) is not None
    assert read_header(_jpeg(photo), max_pixels=120 * 200 - 1) is None, "too_large is the CPU opener's to say"


def test_upright_turns_the_stored_pixels_as_pillow_does_for_every_orientation():
    for name in ("astronaut", "chelsea"):
        photo = getattr(skimage_data, name)()[:96, :160]
        for orientation in range(1, 9):
            data = _jpeg(photo, orientation)
            with Image.open(io.BytesIO(data)) as image:
                stored = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # as nvJPEG gives it
                expected = np.array(ImageOps.exif_transpose(image).convert("RGB"))
            turned = upright(stored, orientation)
            np.testing.assert_array_equal(turned.permute(1, 2, 0).numpy(), expected, err_msg=f"{name} {orientation}")
            assert tuple(turned.shape[1:]) == read_header(data, None).upright_size


@pytest.mark.parametrize("processor", [Siglip2Processor(max_num_patches=64), DINOv3Processor(),
                                       DINOv3Processor(native=True, max_num_patches=64), AIMv2Processor(image_size=224),
                                       LlavaViTProcessor(), LlavaViTProcessor(native=True, max_num_patches=64)],
                         ids=lambda processor: f"{processor.family}-{processor.native}")
def test_device_grid_is_the_grid_of_the_device_path(processor):
    for height, width in ((17, 300), (240, 320), (513, 97), (64, 64)):
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        assert processor.device_grid(height, width) == tuple(processor.on_device([image]).grid_thw[0].tolist())


def test_the_decoder_falls_back_file_by_file_and_loses_no_input():
    photo = skimage_data.coffee()[:80, :120]
    files = [_jpeg(photo, 6), _jpeg(photo[:, ::-1]), _without_segment(_jpeg(photo), 0xDB), _jpeg(photo[:40])]
    jpegs = JpegFiles.join([JpegFile(data, read_header(data, None)) for data in files])
    batches = []

    def refusing(batch):  # refuses whole batches holding the third file, and the fourth file alone
        batches.append(len(batch))
        if len(batch) == 1 and torch.equal(batch[0], jpegs.file(3)):
            raise RuntimeError("nvJPEG: unsupported")
        return pil_stand_in(batch)

    rows = [Row(image_path=f"{index}.jpg", source_index=index) for index in range(4)]
    decoder = JpegDecoder("cpu", refusing)
    images = decoder(jpegs, rows)
    assert batches == [4, 1, 1, 1, 1], "the batch failed: each file alone"
    assert [row.status for row in rows] == ["ok", "ok", "decode_error", "ok"]
    assert "cannot be decoded" in rows[2].error and rows[2].grid == (0, 0, 0)
    assert (decoder.decoded, decoder.cpu_fallbacks) == (2, 2)
    for image, data in zip(images, [files[0], files[1], files[3]]):
        with Image.open(io.BytesIO(data)) as opened:
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.array(ImageOps.exif_transpose(opened)))


def test_a_gpu_run_keeps_the_cpu_runs_rows_and_embeddings(checkpoint, images, tmp_path, stand_in):
    cpu = embed(checkpoint, images, tmp_path / "cpu", decode="cpu", **RUN)
    gpu = embed(checkpoint, images, tmp_path / "gpu", decode="gpu", **{**RUN, "workers": 1})  # files from a worker
    cpu_rows, cpu_embeddings = read_output(tmp_path / "cpu")
    gpu_rows, gpu_embeddings = read_output(tmp_path / "gpu")
    assert gpu_rows == cpu_rows, "every input, its status, message and grid, as the CPU route gives them"
    assert (gpu.ok, gpu.failed) == (cpu.ok, cpu.failed)
    assert gpu.stats.decode == "gpu" and cpu.stats.decode == "cpu"
    names = [str(Path(row["image_path"]).relative_to(images)) for row in cpu_rows]
    assert gpu.stats.gpu_decoded == len(GPU_FILES) and gpu.stats.gpu_fallbacks == 1, "no_tables.jpg: refused, then decode_error"
    jpegs = len(GPU_FILES) + 1  # and no_tables.jpg, whose header parses
    assert stand_in == [jpegs] + [1] * jpegs, "one pack: one batch, refused for no_tables.jpg, then file by file"
    for name, row, ours, reference in zip(names, cpu_rows, gpu_embeddings, cpu_embeddings):
        if row["status"] != "ok":
            assert not ours.any(), name
        elif name in GPU_FILES:  # the device path's resize: within two uint8 levels of the processor's own
            assert ours @ reference / (np.linalg.norm(ours) * np.linalg.norm(reference)) > 0.9999, name
        else:  # the CPU route, as in the CPU run
            np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0, err_msg=name)
    by_name = dict(zip(names, cpu_rows))
    assert by_name["no_tables.jpg"]["status"] == "decode_error" and by_name["cmyk.jpg"]["status"] == "ok"
    assert json.loads((tmp_path / "gpu" / "manifest.json").read_text())["settings"]["processor"]["decode"] == "gpu"


def test_auto_takes_the_gpu_route_below_the_measured_worker_count(monkeypatch):
    """Where nvJPEG serves, ``auto`` is the GPU route for fewer workers than the CPU route needs to
    outrun it (``AUTO_CPU_ROUTE_WORKERS``), the CPU route from there on; ``gpu`` is the GPU route
    whatever the workers."""
    monkeypatch.setattr(run, "gpu_decode_unavailable", lambda device: None)
    processor, cuda, many = Siglip2Processor(), torch.device("cuda"), run.AUTO_CPU_ROUTE_WORKERS
    assert run.resolve_decode("auto", None, cuda, processor, 0) == "gpu"
    assert run.resolve_decode("auto", None, cuda, processor, many - 1) == "gpu"
    assert run.resolve_decode("auto", None, cuda, processor, many) == "cpu"
    assert run.resolve_decode("gpu", None, cuda, processor, many) == "gpu"
    assert run.resolve_decode("auto", 2.0, cuda, processor, 1) == "cpu"


def test_auto_is_the_cpu_without_cuda_and_gpu_is_refused_with_the_fix(checkpoint, images, tmp_path, capsys):
    embed(checkpoint, images, tmp_path / "auto", **RUN)
    assert json.loads((tmp_path / "auto" / "manifest.json").read_text())["settings"]["processor"]["decode"] == "cpu"
    with pytest.raises(ValueError, match=r"--decode gpu cannot run here: the device is cpu, not a CUDA device; pass "
                                         r"--decode cpu"):
        embed(checkpoint, images, tmp_path / "gpu", decode="gpu", **RUN)
    assert not (tmp_path / "gpu").exists(), "refused before anything is written"
    common = ["--model", str(checkpoint), "--input", str(images), "--workers", "0", "--quiet"]
    assert embed_main([*common, "--output", str(tmp_path / "x"), "--decode", "gpu", "--jpeg_draft", "2"]) == 2
    assert "--jpeg_draft reduces the CPU's JPEG decoding; nvJPEG (--decode gpu) decodes in full" in capsys.readouterr().err
    assert embed_main([*common, "--output", str(tmp_path / "x"), "--jpeg_draft", "0.5"]) == 2
    assert "--jpeg_draft must be a number of at least 1" in capsys.readouterr().err


def test_a_folder_is_not_continued_with_another_decode_path_or_file_rule(checkpoint, images, tmp_path, stand_in):
    output = tmp_path / "out"
    embed(checkpoint, images, output, decode="cpu", shard_size=10, **RUN)
    with pytest.raises(ValueError, match=r"other settings \(processor\.decode: 'cpu' → 'gpu'\).*--overwrite"):
        embed(checkpoint, images, output, decode="gpu", shard_size=10, **RUN)
    manifest_file = output / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["settings"]["processor"]["decode"]  # a folder made before the setting existed: decoded on the CPU
    manifest_file.write_text(json.dumps(manifest))
    assert not embed(checkpoint, images, output, decode="cpu", shard_size=10, **RUN).missing_shards
    with pytest.raises(ValueError, match=r"processor\.decode: 'cpu' → 'gpu'"):
        embed(checkpoint, images, output, decode="gpu", shard_size=10, **RUN)
    del manifest["settings"]["processor"]["transparency_of_files"]  # made when embed opened files itself
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"processor\.transparency_of_files: 'composited onto white, as an image in "
                                         r"memory' → 'as the reference reads a file'"):
        embed(checkpoint, images, output, decode="cpu", shard_size=10, **RUN)


def test_jpeg_draft_is_recorded_and_changes_large_jpegs_little(checkpoint, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for index, name in enumerate(("astronaut", "coffee", "chelsea")):
        (source / f"{index}.jpg").write_bytes(_jpeg(np.tile(getattr(skimage_data, name)(), (2, 2, 1))))  # ~1000 px
    full = embed(checkpoint, source, tmp_path / "full", **RUN)
    drafted = embed(checkpoint, source, tmp_path / "draft", jpeg_draft=2, **RUN)
    assert full.ok == drafted.ok == 3
    settings = json.loads((tmp_path / "draft" / "manifest.json").read_text())["settings"]["processor"]
    assert settings["jpeg_draft"] == 2.0 and settings["decode"] == "cpu", "auto with --jpeg_draft: the CPU"
    (rows, full_embeddings), (draft_rows, draft_embeddings) = read_output(tmp_path / "full"), read_output(tmp_path / "draft")
    assert rows == draft_rows, "the same grid: a reduced decode keeps the resize target"
    cosine = (full_embeddings * draft_embeddings).sum(-1) / np.linalg.norm(full_embeddings, axis=-1) / np.linalg.norm(
        draft_embeddings, axis=-1)
    assert cosine.min() > 0.99 and not np.array_equal(full_embeddings, draft_embeddings)
