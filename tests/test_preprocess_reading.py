"""Image files: ``open_image`` (paths and bytes, EXIF, one error type with a status that names the
file), Pillow's decompression-bomb error wrapped, and transparency in files treated as the
reference's ``load_image`` treats it (dropped), with compositing onto white as the ``alpha`` option."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from packvit.preprocess import ImageReadError, load_processor, open_image
from packvit.preprocess.aimv2 import aimv2_preprocess
from packvit.preprocess.common import to_rgb_uint8
from packvit.preprocess.dinov3 import dinov3_preprocess
from packvit.preprocess.llava_vit import llava_vit_preprocess, preprocess_images
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.siglip2 import Siglip2Processor, siglip2_preprocess
from family_helpers import reference_processor

data = pytest.importorskip("skimage.data")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (its pixel data is one tiny row)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rgba_array():
    """A photograph with a horizontal alpha ramp: uint8 [120, 160, 4]."""
    alpha = np.linspace(0, 255, 160).round().astype(np.uint8)[None].repeat(120, axis=0)
    return np.dstack([data.astronaut()[:120, :160], alpha])


# --- open_image -----------------------------------------------------------------------------------


def test_paths_and_bytes_open_to_the_same_upright_decoded_image(tmp_path):
    array = data.chelsea()[:, :400]  # stored 300 x 400
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated a quarter: 400 x 300
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, quality=95, exif=exif)
    for source in (path, str(path), path.read_bytes()):
        image = open_image(source)
        assert image.size == (300, 400) and image.mode == "RGB"
        assert image.im is not None  # decoded, not a lazy file handle
        with Image.open(path) as stored:
            assert np.array_equal(np.array(image), np.array(ImageOps.exif_transpose(stored)))


def written(name: str, content: bytes):
    """A function of a folder that writes ``content`` to ``name`` there and returns the path."""
    def write(folder):
        (folder / name).write_bytes(content)
        return folder / name
    return write


@pytest.mark.parametrize("make, status, message", [
    (lambda folder: folder / "missing.png", "unreadable", r"image file '.*missing.png': no such file"),
    (lambda folder: folder, "unreadable", r"image file '.*': is a directory, not an image file"),
    (written("zero.jpg", b""), "empty", r"zero.jpg': the file has zero bytes"),
    (written("text.jpg", b"text"), "not_an_image", r"text.jpg': not an image format Pillow reads \(first bytes b'text'\)"),
    (written("flat.png", png_declaring(0, 5)), "empty", r"flat.png': a PNG of 0x5 pixels has no pixels"),
    (written("cut.jpg", encoded(Image.fromarray(data.coffee()), "JPEG")[:3000]), "decode_error",
     r"cut.jpg': cannot be decoded \(OSError: image file is truncated"),
])
def test_every_failure_has_a_status_and_names_the_file(tmp_path, make, status, message):
    source = make(tmp_path)
    with pytest.raises(ImageReadError, match=message) as error:
        open_image(source)
    assert error.value.status == status and isinstance(error.value, ValueError)
    if source.is_file():  # the same file as bytes, named by the caller
        with pytest.raises(ImageReadError, match=r"image file 'photos/x.jpg': ") as error:
            open_image(source.read_bytes(), name="photos/x.jpg")
        assert error.value.status == status


def test_max_pixels_and_pillows_decompression_bomb_limit(tmp_path):
    photo = encoded(Image.fromarray(data.astronaut()))  # 512 x 512
    assert open_image(photo, max_pixels=512 * 512).size == (512, 512)
    with pytest.raises(ImageReadError, match=r"512x512 = 262144 pixels, more than max_pixels=1000; pass a larger "
                                             r"max_pixels \(or None\)") as error:
        open_image(photo, max_pixels=1000)
    assert error.value.status == "too_large"
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30_000, 20_000))  # 600 million pixels, past twice Pillow's limit
    limit = Image.MAX_IMAGE_PIXELS
    for max_pixels in (None, 10**10):
        with pytest.raises(ImageReadError, match=rf"bomb.png': Pillow refuses to decode it as a possible decompression "
                                                 rf"bomb \(Image size \(600000000 pixels\) exceeds limit of {2 * limit} "
                                                 rf"pixels.*raise Pillow's limit before processing, PIL.Image.MAX_IMAGE_PIXELS") as error:
            open_image(bomb, max_pixels=max_pixels)
        assert error.value.status == "too_large"
    with pytest.raises(ImageReadError, match=r"bomb.png': Pillow refuses to decode it"):
        open_image(bomb)  # the default limit
    with pytest.raises(ImageReadError, match=r"12000x8000 = 96000000 pixels, more than max_pixels=89478485"):
        open_image(png_declaring(12_000, 8_000))  # between Pillow's warning and error limits: max_pixels decides


def test_processors_raise_the_wrapped_bomb_error_and_take_max_pixels(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30_000, 20_000))
    for process in (siglip2_preprocess, dinov3_preprocess, aimv2_preprocess, llava_vit_preprocess):
        with pytest.raises(ImageReadError, match="bomb.png': ") as error:
            process(bomb)
        assert error.value.status == "too_large"
    photo = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()).save(photo)
    with pytest.raises(ImageReadError, match="more than max_pixels=1000"):
        Siglip2Processor(max_pixels=1000)(photo)
    with pytest.raises(ValueError, match=r"max_pixels must be a positive integer .* or None, got 0"):
        Siglip2Processor(max_pixels=0)
    assert Siglip2Processor(max_pixels=None)(photo).num_items == 1


# --- transparency ---------------------------------------------------------------------------------


def transparent_files(tmp_path, rgba_array) -> dict:
    """Files with transparency of every kind: RGBA, LA, a palette with a transparent colour."""
    files = {"rgba.png": Image.fromarray(rgba_array, "RGBA"),
             "la.png": Image.fromarray(rgba_array[..., [0, 3]], "LA")}
    palette = Image.fromarray(rgba_array[..., :3]).convert("P")
    palette.info["transparency"] = 0
    files["palette.png"] = palette
    paths = {}
    for name, image in files.items():
        paths[name] = tmp_path / name
        image.save(paths[name], **({"transparency": 0} if name == "palette.png" else {}))
    return paths


def test_files_drop_transparency_as_the_reference_loads_them(tmp_path, rgba_array):
    """A transparent file given as a path (or its bytes) is converted as transformers' load_image
    converts it, Pillow's convert("RGB"), not composited onto white (SigLIP2's processor, which
    does not convert to RGB itself)."""
    for name, path in transparent_files(tmp_path, rgba_array).items():
        with Image.open(path) as stored:
            assert "A" in stored.getbands() or "transparency" in stored.info, name
            dropped = Image.fromarray(np.array(stored.convert("RGB")))  # the pixels, no colour key
            composited = Image.alpha_composite(Image.new("RGBA", stored.size, "white"), stored.convert("RGBA"))
        expected = siglip2_preprocess(dropped, backend="pil")
        for source in (path, str(path), path.read_bytes()):
            batch = siglip2_preprocess(source, backend="pil")
            assert torch.equal(batch.patches, expected.patches), name
        white = siglip2_preprocess(composited.convert("RGB"), backend="pil")
        assert (white.patches - expected.patches).abs().max() > 0.5, name  # compositing would differ by much
        assert torch.equal(Siglip2Processor(backend="pil", alpha="white")(path).patches, white.patches), name


def test_files_match_the_reference_image_loading_and_processor(tmp_path, rgba_array):
    transformers = pytest.importorskip("transformers")
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip("packvit reproduces transformers 5.23's conversion to RGB; 4.x's CLIP processor leaves a "
                    "transparent palette colour as it is")
    load_image = pytest.importorskip("transformers.image_utils").load_image
    siglip2 = reference_processor("Siglip2ImageProcessor", "pil")()
    clip = reference_processor("CLIPImageProcessor", "pil")(size={"shortest_edge": 448},
                                                            crop_size={"height": 448, "width": 448})
    for name, path in transparent_files(tmp_path, rgba_array).items():
        loaded = load_image(str(path))
        expected = siglip2(loaded, max_num_patches=256, return_tensors="pt")
        rows = int(expected["pixel_attention_mask"][0].sum())
        assert torch.equal(siglip2_preprocess(str(path), backend="pil").patches, expected["pixel_values"][0, :rows]), name
        expected = clip(loaded, return_tensors="pt")["pixel_values"]  # the CLIP processor converts to RGB itself
        assert torch.equal(preprocess_images(str(path))[0], expected[0]), name
        assert torch.equal(preprocess_images(path.read_bytes())[0], expected[0]), name
    palette = transparent_files(tmp_path, rgba_array)["palette.png"]  # a transparent colour: CLIP composites it
    assert not torch.equal(preprocess_images(palette)[0], preprocess_images(palette, alpha="drop")[0])


def test_alpha_setting_for_images_in_memory(rgba_array):
    """In memory, the reference composites onto white (do_convert_rgb), and so does the default;
    alpha="drop" keeps the colour channels as stored, alpha="white" composites files too."""
    pil_image = Image.fromarray(rgba_array, "RGBA")
    white = Image.alpha_composite(Image.new("RGBA", pil_image.size, "white"), pil_image).convert("RGB")
    assert torch.equal(to_rgb_uint8(pil_image), to_rgb_uint8(white))
    assert torch.equal(to_rgb_uint8(pil_image, alpha="drop"), to_rgb_uint8(rgba_array[..., :3]))
    assert torch.equal(to_rgb_uint8(rgba_array, alpha="drop"), to_rgb_uint8(rgba_array[..., :3]))
    for backend in ("pil", "torch"):
        composited = to_rgb_uint8(rgba_array, backend)
        assert torch.equal(to_rgb_uint8(rgba_array, backend, alpha="white"), composited)
        assert (composited.int() - to_rgb_uint8(rgba_array[..., :3]).int()).abs().max() > 100
    with pytest.raises(ValueError, match=r"alpha must be one of \('reference', 'drop', 'white'\).*got 'black'"):
        Siglip2Processor(alpha="black")


def test_alpha_is_a_setting_of_every_processor(tmp_path, rgba_array):
    path = transparent_files(tmp_path, rgba_array)["rgba.png"]
    configs = {"siglip2": {"model_type": "siglip2_vision_model", "patch_size": 16},
               "dinov3": {"model_type": "dinov3_vit", "patch_size": 16},
               "aimv2": {"model_type": "aimv2_vision_model", "is_native": True, "patch_size": 14},
               "llava_vit": {"model_type": "onevision_encoder", "patch_size": 14, "image_size": 448}}
    import json

    with Image.open(path) as stored:
        dropped, composited = stored.convert("RGB"), Image.alpha_composite(
            Image.new("RGBA", stored.size, "white"), stored).convert("RGB")
    for family, config in configs.items():
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps(config))
        default = load_processor(tmp_path / family)
        assert torch.equal(default(path).patches, default(dropped).patches), family
        white = load_processor(tmp_path / family, alpha="white")
        assert torch.equal(white(path).patches, default(composited).patches), family


# --- JPEG draft decoding (opt-in) -----------------------------------------------------------------


def test_draft_scale_keeps_the_margin_and_the_target():
    from packvit.preprocess.processor import draft_scale
    from packvit.preprocess.siglip2 import target_size_for_max_num_patches

    def siglip2(height, width):
        return target_size_for_max_num_patches(height, width, 16, 256)

    assert siglip2(1500, 2000) == (224, 288)
    assert draft_scale(1500, 2000, siglip2, margin=2) == 2  # 750 x 1000; a quarter, 375 x 500, is under 448 x 576
    assert draft_scale(1500, 2000, siglip2, margin=1) == 4
    assert draft_scale(1500, 2000, lambda height, width: None, margin=1) == 1  # nothing resized: never reduced
    assert draft_scale(300, 400, siglip2, margin=2) == 1
    # a reduction whose size would be resized to another target is never taken
    assert draft_scale(1000, 1000, lambda height, width: (height // 10, 100), margin=1) == 1


def test_open_image_decodes_a_jpeg_reduced_and_upright(tmp_path):
    array = data.astronaut()[:400, :500]  # stored 400 x 500
    exif = Image.Exif()
    exif[0x0112] = 6  # shown as 500 x 400
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, quality=90, exif=exif)
    asked = []
    image = open_image(path, draft=lambda height, width: asked.append((height, width)) or 4)
    assert asked == [(500, 400)] and image.size == (100, 125)  # upright, a quarter per side
    png = tmp_path / "photo.png"
    Image.fromarray(array).save(png)
    assert open_image(png, draft=lambda height, width: 4).size == (500, 400)  # only JPEGs are drafted
    with pytest.raises(ImageReadError, match=r"a JPEG decodes at a reduction of \(1, 2, 4, 8\), not 3") as error:
        open_image(path, draft=lambda height, width: 3)
    assert error.value.status == "decode_error"


def test_jpeg_draft_keeps_every_grid_and_nearly_every_value(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(((1800, 1200), (1100, 1900), (900, 1600), (420, 500))):
        top, left = rng.integers(0, 100, size=2)
        photo = Image.fromarray(data.astronaut()[top:, left:]).resize((width, height), Image.Resampling.BICUBIC)
        paths.append(tmp_path / f"{index}.jpg")
        photo.save(paths[-1], quality=90)
    for make, margin in ((lambda **s: Siglip2Processor(**s), 2), (lambda **s: DINOv3Processor(**s), 2),
                         (lambda **s: LlavaViTProcessor(**s), 1), (lambda **s: LlavaViTProcessor(native=True, **s), 1)):
        full, drafted = make()(paths), make(jpeg_draft=margin)(paths)
        assert torch.equal(full.grid_thw, drafted.grid_thw)
        difference = (full.patches - drafted.patches).abs()
        assert 0 < difference.mean() < 0.01 and difference.max() < 0.5
        assert torch.equal(make(jpeg_draft=margin)([path.read_bytes() for path in paths]).patches, drafted.patches)
    last = Siglip2Processor(jpeg_draft=2)
    assert torch.equal(last(paths[-1]).patches, Siglip2Processor()(paths[-1]).patches)  # too small to reduce
