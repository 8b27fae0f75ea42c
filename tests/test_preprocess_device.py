"""The device path, ``processor.on_device(images)``: uint8 images already on a device resized,
cropped, patchified and normalised there. Run here on the CPU (it is device-agnostic) against
each backend's own processor on real photographs: the same grids and positions, pixels within a
uint8 level of the reference's (two for the torch backend, as far as the two references differ
from each other), normalisation exact, DINOv3 exactly its reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from packvit.packing import BatchOrigin
from packvit.positions import resize_weights_tensor
from packvit.preprocess.aimv2 import AIMv2Processor
from packvit.preprocess.device import pass_matrices, pillow_vertical_first
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.siglip2 import Siglip2Processor

data = pytest.importorskip("skimage.data")

#: (processor, the largest uint8 difference, the largest fraction of pixels that differ)
PROCESSORS = {
    "siglip2 torch": (lambda: Siglip2Processor(), 1, 0.003),
    "siglip2 pil 1024": (lambda: Siglip2Processor(backend="pil", max_num_patches=1024), 2, 0.003),
    "aimv2 224 pil": (lambda: AIMv2Processor(image_size=224), 1, 0.001),
    "aimv2 224 torch": (lambda: AIMv2Processor(image_size=224, backend="torch"), 2, 0.006),
    "aimv2 native": (lambda: AIMv2Processor(is_native=True, max_num_patches=400), 1, 0.001),
    "onevision pil": (lambda: LlavaViTProcessor(), 1, 0.001),
    "onevision torch": (lambda: LlavaViTProcessor(backend="torch"), 2, 0.006),
    "onevision native": (lambda: LlavaViTProcessor(native=True, max_num_patches=300), 1, 0.001),
}


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    """uint8 [3, H, W] photographs of many sizes and aspect ratios, as GPU decoding returns them."""
    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()[:600, :200],
              data.immunohistochemistry()[:300], data.retina()[::3, ::2], data.astronaut()[:37, :500]]
    return [torch.from_numpy(array).permute(2, 0, 1).contiguous() for array in arrays]


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_device_path_agrees_with_the_processor(name, photos):
    make, max_levels, max_fraction = PROCESSORS[name]
    processor = make()
    reference = processor.resize(photos)
    keeps_aspect, cap, backend = processor._options(None, None, None)
    pixels = processor.resize_device_images(photos, keeps_aspect, cap, backend)
    assert torch.equal(pixels.grid_thw, reference.grid_thw)
    levels = (pixels.pixels.int() - reference.pixels.int()).abs()
    assert levels.max() <= max_levels and 0 < (levels > 0).float().mean() < max_fraction
    batch = processor.on_device(photos)
    assert torch.equal(batch.patches, processor.normalize(pixels).patches)  # normalisation exactly the backend's
    assert batch.origin == reference.origin and batch.patch_layout == processor.patch_layout
    if processor.family == "llava_vit":
        assert torch.equal(batch.patch_positions, processor(photos).patch_positions)


@pytest.mark.parametrize("native", [False, True])
def test_dinov3_on_the_device_is_its_reference(native, photos):
    processor = DINOv3Processor(native=native, max_num_patches=256 if native else None)
    batch = processor.on_device(photos)
    expected = processor(photos)
    assert torch.equal(batch.grid_thw, expected.grid_thw) and torch.equal(batch.patches, expected.patches)


def test_inputs_the_device_path_takes(photos):
    processor = Siglip2Processor(max_num_patches=64)
    expected = processor.on_device(photos[:1])
    grey = photos[1][:1]  # [1, H, W]
    assert torch.equal(processor.on_device(grey).patches, processor.on_device(grey.expand(3, -1, -1)).patches)
    assert torch.equal(processor.on_device(torch.stack([photos[0]] * 2)).patches, torch.cat([expected.patches] * 2))
    bfloat16 = processor.on_device(photos[:1], dtype=torch.bfloat16)
    assert bfloat16.patches.dtype == torch.bfloat16 and torch.equal(bfloat16.patches, expected.patches.bfloat16())
    assert processor.on_device(photos[:1], max_num_patches=16).grid_thw.tolist() == [[1, 4, 4]]
    assert expected.origin == BatchOrigin("siglip2", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("bad, error, message", [
    ([], TypeError, r"on_device takes a uint8 tensor .* got an empty list"),
    ([np.zeros((3, 8, 8), np.uint8)], ValueError, r"images\[0\] is ndarray; on_device takes uint8 \[C, H, W\] tensors"),
    ([torch.zeros(3, 8, 8)], ValueError, r"images\[0\] is torch.float32 \(3, 8, 8\); on_device takes uint8"),
    ([torch.zeros(4, 8, 8, dtype=torch.uint8)], ValueError, r"images\[0\] has 4 channels; on_device takes RGB or grey"),
    ([torch.zeros(3, 0, 8, dtype=torch.uint8)], ValueError, r"images\[0\] is 0x8 pixels: an image with no pixels"),
    ([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8, device="meta")], ValueError,
     r"images\[1\] is on meta but images\[0\] on cpu"),
])
def test_bad_device_inputs_are_named(bad, error, message):
    with pytest.raises(error, match=message):
        Siglip2Processor().on_device(bad)


def test_a_strip_costs_its_crop():
    """Only the rows and columns a crop keeps are computed: a 1 x 10000 strip's 448 centre crop of
    its 448 x 4,480,000 resize, in the torch backend too (whose CPU processor refuses it)."""
    strip = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 10000), dtype=np.uint8))
    start = time.perf_counter()
    for backend in ("pil", "torch"):
        batch = LlavaViTProcessor(backend=backend).on_device([strip])
        assert batch.grid_thw.tolist() == [[1, 32, 32]]
    assert time.perf_counter() - start < 5
    reference = LlavaViTProcessor().resize([strip.permute(1, 2, 0).numpy()])  # the PIL backend's crop-first path
    pixels = LlavaViTProcessor().resize_device_images([strip], False, None, "pil")
    assert (pixels.pixels.int() - reference.pixels.int()).abs().max() <= 2


def test_band_weights_are_the_resize_weights():
    for in_size, out_size, start, length in ((2000, 288, 0, 288), (451, 672, 112, 448), (7, 448, 0, 448),
                                             (224, 224, -16, 256), (37, 13, 0, 13), (1, 224, 0, 224)):
        for mode in ("bilinear", "bicubic"):
            band, = pass_matrices([(in_size, out_size, start, length)], mode, "cpu")
            inside = (max(0, start), min(out_size, start + length))
            dense = torch.zeros(length, in_size, dtype=torch.float64)
            if in_size == out_size:
                dense[inside[0] - start : inside[1] - start] = torch.eye(in_size, dtype=torch.float64)[slice(*inside)]
            else:
                dense[inside[0] - start : inside[1] - start] = resize_weights_tensor(in_size, out_size, mode)[slice(*inside)]
            assert (band - dense).abs().max() < 1e-12, (in_size, out_size, start, length, mode)
    assert pass_matrices([(100, 100, 0, 100)], "bilinear", "cpu") == [None]  # a pass that changes nothing


def test_the_pil_backend_follows_pillows_pass_order():
    """Pillow 13 resizes with its vertical pass first where the height shrinks by more than twice
    as many pixels as the width; in the other order a third of the pixels would be off by a level."""
    from PIL import Image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (600, 200, 3), dtype=np.uint8)
    size = (476, 154)  # the height shrinks by 124 pixels, the width by 46
    expected = torch.from_numpy(np.array(Image.fromarray(array).resize(size[::-1], Image.Resampling.BICUBIC)))
    from packvit.preprocess.device import PILLOW_ORDERS_PASSES, ResizePlan, resize_on_device

    assert pillow_vertical_first(600, 200, size) == PILLOW_ORDERS_PASSES
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    for pillow_order in (True, False):
        resized, = resize_on_device([image], [ResizePlan.whole(size)], "bicubic", pillow_order=pillow_order)
        differing = (resized.permute(1, 2, 0).int() - expected.int()).abs().gt(0).float().mean()
        assert (differing < 0.001) == (pillow_order or not PILLOW_ORDERS_PASSES)
