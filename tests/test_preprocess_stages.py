"""The processor's two stages: ``processor.resize(images)`` → uint8 ``PixelBatch`` (a CPU worker's
part), ``processor.normalize(pixels, device=, dtype=)`` → ``PackedBatch`` (anywhere), together
bit for bit ``processor(images)``; and the uint8 paths stage 1 takes (Pillow's own memory, four-byte
pixels resized channel by channel) equal to the plain ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from packvit.preprocess import PixelBatch
from packvit.preprocess.aimv2 import AIMv2Processor
from packvit.preprocess.common import RGBPixels, rgb_pixels
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.pixels import Normalization
from packvit.preprocess.siglip2 import Siglip2Processor

data = pytest.importorskip("skimage.data")

PROCESSORS = {
    "siglip2 torch": lambda: Siglip2Processor(max_num_patches=64),
    "siglip2 pil": lambda: Siglip2Processor(max_num_patches=64, backend="pil"),
    "dinov3 fixed": lambda: DINOv3Processor(),
    "dinov3 native": lambda: DINOv3Processor(native=True, max_num_patches=64),
    "aimv2 224 pil": lambda: AIMv2Processor(image_size=224),
    "aimv2 224 torch": lambda: AIMv2Processor(image_size=224, backend="torch"),
    "aimv2 native": lambda: AIMv2Processor(is_native=True, max_num_patches=64),
    "onevision pil": lambda: LlavaViTProcessor(image_size=224),
    "onevision torch": lambda: LlavaViTProcessor(image_size=224, backend="torch"),
    "onevision native": lambda: LlavaViTProcessor(native=True, max_num_patches=64, backend="torch"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Photographs of several sizes and kinds: arrays, PIL images, a JPEG path and its bytes."""
    path = tmp_path_factory.mktemp("files") / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path, quality=90)
    return [data.chelsea(), Image.fromarray(data.astronaut()[:300, :460]), data.camera()[:200, :333], path,
            path.read_bytes(), Image.fromarray(data.logo())]


def assert_same_batch(a, b):
    assert a.patch_layout == b.patch_layout and a.origin == b.origin
    assert torch.equal(a.grid_thw, b.grid_thw)
    assert a.patches.dtype == b.patches.dtype and torch.equal(a.patches, b.patches)
    assert (a.patch_positions is None) == (b.patch_positions is None)
    if a.patch_positions is not None:
        assert torch.equal(a.patch_positions, b.patch_positions)


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_two_stages_are_the_processor_bit_for_bit(name, images):
    processor = PROCESSORS[name]()
    pixels = processor.resize(images)
    assert isinstance(pixels, PixelBatch) and pixels.pixels.dtype == torch.uint8
    batch = processor.normalize(pixels)
    assert_same_batch(batch, processor(images))
    assert pixels.num_items == len(images) and torch.equal(pixels.grid_thw, batch.grid_thw)
    if pixels.source_sizes is None:  # uint8 patches: a quarter of float32's bytes
        assert pixels.pixels.shape == batch.patches.shape
    bfloat16 = processor.normalize(pixels, dtype=torch.bfloat16)
    assert bfloat16.patches.dtype == torch.bfloat16 and torch.equal(bfloat16.patches, batch.patches.bfloat16())


def test_onevision_videos_through_the_two_stages(images):
    processor = LlavaViTProcessor()
    video = np.stack([data.astronaut()[:300, :400]] * 3)
    pixels = processor.resize(images[:2], videos=[video, images[:4]])
    assert pixels.grid_thw.tolist() == [[1, 32, 32]] * 2 + [[3, 16, 16], [4, 16, 16]]
    assert_same_batch(processor.normalize(pixels), processor(images[:2], videos=[video, images[:4]]))


def test_pixel_batches_concatenate_and_move(images):
    processor = Siglip2Processor(max_num_patches=100)
    first, second = processor.resize(images[:2]), processor.resize(images[2:])
    joined = PixelBatch.concat([first, second])
    assert_same_batch(processor.normalize(joined), processor(images))
    assert_same_batch(processor.normalize(joined.to("cpu"), device="cpu"), processor(images))
    sources = [DINOv3Processor().resize(images[:3]), DINOv3Processor().resize(images[3:])]
    assert_same_batch(DINOv3Processor().normalize(PixelBatch.concat(sources)), DINOv3Processor()(images))
    with pytest.raises(ValueError, match="joins batches of one processor and backend only"):
        PixelBatch.concat([first, Siglip2Processor(backend="pil").resize(images[:1])])


def test_normalize_refuses_what_is_not_its_own(images):
    pixels = Siglip2Processor().resize(images[:1])
    with pytest.raises(ValueError, match="made by a siglip2 processor, not this dinov3 one"):
        DINOv3Processor().normalize(pixels)
    with pytest.raises(TypeError, match=r"normalize takes the PixelBatch of processor.resize\(...\), got PackedBatch"):
        Siglip2Processor().normalize(Siglip2Processor()(images[:1]))
    with pytest.raises(ValueError, match="rescale_factor .* has no exact float32 form"):
        Normalization((0.5,) * 3, (0.5,) * 3, "pil", 0.004006688963210703)


def test_pillow_memory_is_the_image_pixels(images):
    """Stage 1 reads an RGB PIL image's pixels from Pillow's own memory where it can (no copy)."""
    pytest.importorskip("pyarrow")
    for image in (Image.fromarray(data.chelsea()), Image.open(images[3])):
        rgb = RGBPixels(pil=image.convert("RGB") if image.mode != "RGB" else image)
        assert torch.equal(rgb.hwc(), torch.from_numpy(np.array(image.convert("RGB"))))
        assert rgb.batch(padded=True).shape[1] == 4 and rgb.hwc().stride()[1] == 4  # four bytes a pixel
    large = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8))
    rgb = RGBPixels(pil=large)  # more than one 16 MiB block of Pillow's memory: copied instead
    assert torch.equal(rgb.hwc(), torch.from_numpy(np.array(large))) and rgb.batch(padded=True).shape[1] == 3


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_four_byte_pixels_resize_channel_by_channel(mode):
    """torch's uint8 antialiased resize of [1, 4, H, W] gives channels 0-2 exactly as [1, 3, H, W] does
    (what reading Pillow's four-byte pixels relies on), shrinking, enlarging, to one row or column."""
    rng = np.random.default_rng(0)
    for array in (data.chelsea(), data.coffee()[:, :517], rng.integers(0, 256, (37, 901, 3), dtype=np.uint8)):
        padded = torch.from_numpy(np.dstack([array, rng.integers(0, 256, array.shape[:2], dtype=np.uint8)]))
        for size in ((224, 288), (37, 13), (640, 480), (1, 50), (60, 1)):
            four = F.interpolate(padded[None].permute(0, 3, 1, 2), size=list(size), mode=mode, antialias=True)
            three = F.interpolate(torch.from_numpy(array)[None].permute(0, 3, 1, 2).contiguous(), size=list(size),
                                  mode=mode, antialias=True)
            assert torch.equal(four[:, :3], three), (array.shape, size)


def test_rgb_pixels_of_every_input_kind_agree(images):
    with Image.open(images[3]) as decoded:
        expected = torch.from_numpy(np.array(decoded))
    for source in (images[3], images[4], Image.open(images[3]), expected.numpy(), expected.permute(2, 0, 1)):
        rgb = rgb_pixels(source, "torch")
        assert torch.equal(rgb.hwc(), expected) and torch.equal(rgb.chw(), expected.permute(2, 0, 1))
        assert np.array_equal(np.array(rgb.pil()), expected.numpy())
