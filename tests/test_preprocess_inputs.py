"""Inputs every processor takes alike: one image or a sequence, of PIL images, uint8 arrays and tensors
and paths (upright by their EXIF orientation); 16-bit greyscale scaled to 8 bits; clear errors for
everything else; and images of extreme aspect ratio processed in bounded time and memory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from packvit.preprocess.aimv2 import aimv2_preprocess
from packvit.preprocess.clip import (
    CLIP_STD,
    FULL_RESIZE_MAX_RATIO,
    clip_center_crop,
    clip_preprocess,
    clip_resize,
    clip_resize_center_crop,
)
from packvit.preprocess.common import image_list, to_rgb_uint8
from packvit.preprocess.reading import ImageReadError
from packvit.preprocess.dinov3 import dinov3_preprocess, preprocess_fixed
from packvit.preprocess.llava_vit import llava_vit_preprocess
from packvit.preprocess.siglip2 import siglip2_preprocess
from family_helpers import reference_processor

data = pytest.importorskip("skimage.data")

#: every family's packed processor, in each of its modes (small caps keep the test fast)
FAMILY_PROCESSORS = {
    "siglip2": lambda images: siglip2_preprocess(images, max_num_patches=64, backend="pil"),
    "dinov3 fixed": lambda images: dinov3_preprocess(images),
    "dinov3 native": lambda images: dinov3_preprocess(images, native=True, max_num_patches=64),
    "aimv2 fixed": lambda images: aimv2_preprocess(images, 224),
    "aimv2 native": lambda images: aimv2_preprocess(images, native=True, max_num_patches=64),
    "llava_vit": lambda images: llava_vit_preprocess(images),
    "llava_vit native": lambda images: llava_vit_preprocess(images, native=True, max_num_patches=64),
}


def assert_same_batch(a, b):
    assert a.patch_layout == b.patch_layout
    assert torch.equal(a.grid_thw, b.grid_thw)
    assert torch.equal(a.patches, b.patches)


@pytest.fixture(scope="module")
def chelsea():
    return data.chelsea()  # uint8 [300, 451, 3]


# --- one input convention ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_every_image_type_gives_the_same_batch(family, chelsea, tmp_path):
    process = FAMILY_PROCESSORS[family]
    expected = process([Image.fromarray(chelsea)])
    assert expected.num_items == 1
    path = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    tensor = torch.from_numpy(chelsea).permute(2, 0, 1).contiguous()
    for single in (Image.fromarray(chelsea), chelsea, tensor, str(path), path, path.read_bytes()):
        assert_same_batch(process(single), expected)
    pair = process([chelsea, Image.fromarray(chelsea)])
    assert pair.num_items == 2
    for pair_input in ((tensor, str(path)), np.stack([chelsea] * 2), torch.stack([tensor] * 2),
                       (image for image in (chelsea, path))):
        assert_same_batch(process(pair_input), pair)


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_grey_and_transparent_arrays_are_one_image(family):
    """A 2-D array is one grey image, not a batch of rows; [H, W, 1] and [H, W, 4] are one image too."""
    process = FAMILY_PROCESSORS[family]
    grey = data.camera()[:280, :350]  # uint8 [280, 350]
    batch = process(grey)
    assert batch.num_items == 1
    assert_same_batch(batch, process(Image.fromarray(grey)))
    assert_same_batch(process(grey[:, :, None]), batch)
    logo = data.logo()  # uint8 [500, 500, 4]
    assert process(logo).num_items == 1
    assert_same_batch(process(logo), process([logo]))


def test_dinov3_takes_a_single_array_and_a_bare_pil_image(chelsea):
    """The two inputs that used to fail: one array (taken as a batch of rows) and one PIL image."""
    assert preprocess_fixed(chelsea).shape == (1, 3, 224, 224)
    assert torch.equal(preprocess_fixed(Image.fromarray(chelsea)), preprocess_fixed([chelsea]))
    assert dinov3_preprocess(Image.fromarray(chelsea)).grid_thw.tolist() == [[1, 14, 14]]


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (None, (TypeError, ValueError), r"images is None.*one image or a sequence of images, where an image is a PIL image"),
        (3, TypeError, r"images is int; pass one image or a sequence .* a path \(str or pathlib.Path\)"),
        ({"a": 1}, TypeError, r"images is dict"),
        ([], ValueError, r"images is empty: pass at least one image"),
        ([np.zeros((20, 20, 3), np.uint8), 7], TypeError, r"images\[1\] is int, not an image"),
        ([np.zeros((2, 20, 20, 3), np.uint8)], ValueError, r"images\[0\].*a 4-D array is a batch of images"),
        (np.zeros((20, 20, 5), np.uint8), ValueError, r"\[H, W\] or \[H, W, C\] with 1, 3 or 4 channels, got shape \(20, 20, 5\)"),
        (np.zeros((1, 2, 20, 20, 3), np.uint8), ValueError, r"got shape \(1, 2, 20, 20, 3\)"),
    ],
)
def test_bad_inputs_are_named(family, bad, error, message):
    with pytest.raises(error, match=message):
        FAMILY_PROCESSORS[family](bad)


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_non_uint8_and_channels_last_inputs_say_how_to_fix_them(family):
    process = FAMILY_PROCESSORS[family]
    with pytest.raises(ValueError, match=r"array images must be uint8, got float32; convert values in \[0, 1\] with \(x \* 255\)"):
        process(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint16; scale 16-bit values to uint8 with round\(x \* 255 / 65535\)"):
        process(np.zeros((20, 20), np.uint16))
    with pytest.raises(ValueError, match=r"tensor images must be uint8, got torch.float32"):
        process(torch.zeros(3, 20, 20))
    channels_last = torch.zeros(40, 30, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape \(40, 30, 3\) is channels last \(\[H, W, C\]\).*tensor.permute\(2, 0, 1\)"):
        process(channels_last)
    with pytest.raises(ValueError, match=r"\[C, H, W\] with C in 1, 3 or 4, got shape \(5, 20, 20\)"):
        process(torch.zeros(5, 20, 20, dtype=torch.uint8))


# --- paths: EXIF orientation, unreadable files ----------------------------------------------------


def write_rotated_jpeg(path: Path, array: np.ndarray, orientation: int = 6) -> None:
    """A JPEG whose pixels are stored as given, with an EXIF orientation tag saying how to show them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, quality=95, exif=exif)


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_paths_are_turned_upright_by_their_exif_orientation(family, chelsea, tmp_path):
    process = FAMILY_PROCESSORS[family]
    path = tmp_path / "rotated.jpg"
    write_rotated_jpeg(path, chelsea[:, :400])  # stored 300 x 400, shown 400 x 300
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == 6 and stored.size == (400, 300)
        upright = ImageOps.exif_transpose(stored)
        assert upright.size == (300, 400)
        as_stored = np.array(stored)
    from_path = process(path)
    assert_same_batch(from_path, process(upright))
    unrotated = process(as_stored)  # another grid, or (224 x 224 either way) other pixels
    assert (unrotated.grid_thw.tolist() != from_path.grid_thw.tolist()
            or (unrotated.patches - from_path.patches).abs().max() > 0.5)
    # a PIL image passed in is taken as it is, never rotated (as the reference processors take it)
    with Image.open(path) as stored:
        assert_same_batch(process(stored), process(as_stored))


def test_to_rgb_uint8_of_a_rotated_path(chelsea, tmp_path):
    path = tmp_path / "rotated.jpg"
    write_rotated_jpeg(path, chelsea)
    rgb = to_rgb_uint8(path)
    assert rgb.shape == (3, 451, 300)  # the stored 300 x 451, turned a quarter
    with Image.open(path) as stored:
        assert torch.equal(rgb, torch.from_numpy(np.array(ImageOps.exif_transpose(stored))).permute(2, 0, 1))


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_unreadable_files_name_the_file_and_say_why(family, tmp_path):
    process = FAMILY_PROCESSORS[family]
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageReadError, match=f"image file '{missing}': no such file") as error:
        process(missing)
    assert error.value.status == "unreadable"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match=f"image file '{text}': not an image format Pillow reads") as error:
        process([np.zeros((20, 20, 3), np.uint8), str(text)])
    assert error.value.status == "not_an_image"
    with pytest.raises(ImageReadError, match=f"image file '{tmp_path}': is a directory") as error:
        process(tmp_path)
    assert error.value.status == "unreadable"
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(data.chelsea()).save(tmp_path / "whole.jpg")
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:2000])
    with pytest.raises(ImageReadError, match=f"image file '{truncated}': cannot be decoded") as error:
        process(truncated)
    assert error.value.status == "decode_error"
    with pytest.raises(ImageReadError, match="image file of 4 bytes: not an image format") as error:
        process(b"\x89PNG")
    assert error.value.status == "not_an_image" and isinstance(error.value, ValueError)


# --- 16-bit greyscale ----------------------------------------------------------------------------


@pytest.fixture
def sixteen_bit_png(tmp_path):
    """A real 16-bit greyscale PNG on disk: a gradient over the whole 0..65535 range."""
    gradient = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    path = tmp_path / "gradient16.png"
    Image.fromarray(gradient).save(path)
    expected = np.round(gradient.astype(np.float64) * 255 / 65535).astype(np.uint8)  # [48, 64]
    return path, gradient, torch.from_numpy(np.repeat(expected[None], 3, axis=0))


def test_a_16_bit_png_is_scaled_to_8_bits(sixteen_bit_png):
    path, gradient, expected = sixteen_bit_png
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")
        assert torch.equal(to_rgb_uint8(image), expected)
        clipped = np.array(image.convert("RGB"))  # what converting to RGB alone gives
    assert (clipped == 255).mean() > 0.95 and expected.float().mean() < 130
    assert torch.equal(to_rgb_uint8(path), expected)
    assert torch.equal(to_rgb_uint8(str(path), "torch"), expected)
    grey8 = expected[0].numpy()
    assert_same_batch(siglip2_preprocess(path, backend="pil"), siglip2_preprocess(grey8, backend="pil"))
    assert_same_batch(dinov3_preprocess(path), dinov3_preprocess(grey8))
    assert torch.equal(clip_preprocess(path)[0], clip_preprocess(grey8)[0])


def test_every_16_bit_mode_and_the_refused_ones(sixteen_bit_png):
    _, gradient, expected = sixteen_bit_png
    height, width = gradient.shape
    images = [
        Image.fromarray(gradient),  # I;16
        Image.frombytes("I;16B", (width, height), gradient.astype(">u2").tobytes()),
        Image.frombytes("I;16L", (width, height), gradient.astype("<u2").tobytes()),
        Image.fromarray(gradient.astype(np.int32)),  # I, 16-bit values
    ]
    assert [image.mode for image in images] == ["I;16", "I;16B", "I;16L", "I"]
    for image in images:
        assert torch.equal(to_rgb_uint8(image), expected), image.mode
    with pytest.raises(ValueError, match=r"mode 'I' \(32-bit integers\) holds values from 0 to 70000.*convert it to 8 bits"):
        to_rgb_uint8(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match=r"mode 'F' \(32-bit floats\) has no known value range; scale it to 0..255"):
        siglip2_preprocess(Image.fromarray(gradient.astype(np.float32) / 65535))


# --- extreme aspect ratios -----------------------------------------------------------------------


def strips():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(1, 10000, 3), dtype=np.uint8)
    return [wide, np.ascontiguousarray(wide.transpose(1, 0, 2))]


@pytest.mark.parametrize(
    "name, process, grid",
    [
        ("aimv2 224", lambda image: aimv2_preprocess(image, 224), [1, 16, 16]),
        ("aimv2 336", lambda image: aimv2_preprocess(image, 336), [1, 24, 24]),
        ("aimv2 448", lambda image: aimv2_preprocess(image, 448), [1, 32, 32]),
        ("onevision 448", lambda image: llava_vit_preprocess(image), [1, 32, 32]),
        ("onevision video", lambda image: llava_vit_preprocess(videos=[[image] * 2]), [2, 16, 16]),
        ("dinov3", lambda image: dinov3_preprocess(image), [1, 14, 14]),
    ],
)
def test_a_1_by_10000_strip_is_fast(name, process, grid):
    for strip in strips():
        start = time.perf_counter()
        batch = process(strip)
        assert time.perf_counter() - start < 5, name
        assert batch.grid_thw.tolist() == [grid]


def test_strips_at_native_resolution_and_through_siglip2():
    wide, tall = strips()
    assert siglip2_preprocess(wide, backend="pil").grid_thw.tolist() == [[1, 1, 256]]
    assert dinov3_preprocess(tall, native=True).grid_thw.tolist() == [[1, 625, 1]]
    assert llava_vit_preprocess(wide, native=True).grid_thw.tolist() == [[1, 1, 714]]
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        aimv2_preprocess(wide, native=True)


def test_the_torch_backend_refuses_what_it_cannot_crop_cheaply():
    wide, _ = strips()
    with pytest.raises(ValueError, match=r"1x10000 pixels would be resized to 224x2240000 .* use backend='pil'"):
        aimv2_preprocess(wide, 224, backend="torch")
    with pytest.raises(ValueError, match=r"use backend='pil'"):
        llava_vit_preprocess([wide], backend="torch")


def extreme_images():
    """Random images a little and far beyond the full-resize limit, both orientations, even and odd sizes."""
    rng = np.random.default_rng(1)
    images = []
    for height, width in ((3, 2000), (7, 1001), (12, 1800), (20, 1500)):
        array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images += [array, np.ascontiguousarray(array.transpose(1, 0, 2))]
    return images


@pytest.mark.parametrize("size, crop", [(224, 224), (448, 448), (100, (90, 130)), (224, (300, 200))])
def test_cropping_before_resizing_matches_the_full_resize(size, crop):
    """Beyond the limit the "pil" backend resizes only what the crop keeps: equal to resizing the
    whole image and cropping up to floating-point rounding of Pillow's box (rare one or two uint8 levels)."""
    differing = []
    for array in extreme_images():
        rgb = to_rgb_uint8(array)
        full = clip_center_crop(clip_resize(rgb, size), crop)
        cropped_first = clip_resize_center_crop(array, size, crop)
        assert cropped_first.shape == full.shape
        assert (cropped_first.int() - full.int()).abs().max() <= 2
        differing.append((cropped_first != full).float().mean().item())
    assert max(differing) < 0.005 and sum(differing) / len(differing) < 0.001


def test_extreme_images_against_the_reference_processor():
    """Up to the limit the reference's own full resize is taken (bit for bit); beyond it, the crop
    first, within two uint8 levels of it."""
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")
    if int(pytest.importorskip("transformers").__version__.split(".")[0]) < 5:
        pytest.skip("packvit reproduces transformers 5's processors; 4.x's differs on extreme aspect ratios "
                    "(a 3x2000 strip: up to 233 levels)")
    reference = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    rng = np.random.default_rng(2)
    at_limit = rng.integers(0, 256, size=(7, 7 * FULL_RESIZE_MAX_RATIO, 3), dtype=np.uint8)  # 224 x 14336: 64 crops
    for image in (at_limit, at_limit.transpose(1, 0, 2)):
        expected = reference(Image.fromarray(np.ascontiguousarray(image)), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(clip_preprocess(image)[0], expected)
    for image in extreme_images():
        expected = reference(Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
        levels = ((clip_preprocess(image)[0] - expected) * torch.tensor(CLIP_STD)[:, None, None] * 255).abs()
        assert levels.max() <= 2 + 1e-3


def test_image_list_keeps_single_images_whole():
    array = np.zeros((5, 6, 3), np.uint8)
    assert len(image_list(array)) == 1 and image_list(array)[0] is array
    assert len(image_list(np.zeros((4, 5, 6, 3), np.uint8))) == 4
    assert len(image_list(torch.zeros(4, 3, 5, 6, dtype=torch.uint8))) == 4
    assert len(image_list(np.zeros((5, 6), np.uint8))) == 1
