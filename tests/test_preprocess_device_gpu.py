"""The device path on CUDA: the same pixels as on the CPU (float64 passes on either), patches on
the GPU in the model's dtype, no host synchronisation, and its cost per image for a pack of
photographs (printed for the GPU report)."""

import time

import numpy as np
import pytest
import torch

from packvit.preprocess.aimv2 import AIMv2Processor
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.siglip2 import Siglip2Processor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

data = pytest.importorskip("skimage.data")
CUDA = torch.device("cuda")
PROCESSORS = {
    "siglip2": lambda: Siglip2Processor(),
    "siglip2 pil": lambda: Siglip2Processor(backend="pil"),
    "dinov3": lambda: DINOv3Processor(),
    "dinov3 native": lambda: DINOv3Processor(native=True),
    "aimv2 224": lambda: AIMv2Processor(image_size=224),
    "onevision": lambda: LlavaViTProcessor(),
    "onevision native torch": lambda: LlavaViTProcessor(native=True, backend="torch"),
}


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    arrays += [array[rng.integers(0, 60):, rng.integers(0, 60):] for array in arrays * 3]  # other sizes
    return [torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous() for array in arrays]


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_gpu_gives_the_cpu_device_path(name, photos):
    processor = PROCESSORS[name]()
    on_cpu = processor.on_device(photos)
    on_gpu = processor.on_device([photo.to(CUDA) for photo in photos], dtype=torch.bfloat16)
    assert on_gpu.patches.device.type == "cuda" and on_gpu.patches.dtype == torch.bfloat16
    assert torch.equal(on_gpu.grid_thw, on_cpu.grid_thw)
    difference = (on_gpu.patches.float().cpu() - on_cpu.patches.bfloat16().float()).abs()
    if processor.family == "dinov3":  # its reference's F.interpolate, CUDA's kernel against the CPU's
        assert difference.max() < 0.02
    else:
        # the same float64 passes, each side rounding its resized pixels to uint8 levels; a sum that
        # lands on .5 rounds either way under the GPU's fused multiply-adds (measured on an H200:
        # SigLIP2's exact downscales, 0.12% of values), so values differ by at most one level
        level = 1 / (255 * min(on_cpu.origin.image_std))
        assert difference.max() <= level + 2.0**-7  # one level and a bf16 rounding step
        assert (difference > 0).float().mean() < 1e-2


@pytest.mark.parametrize("name", ["siglip2", "dinov3", "onevision"])
def test_no_host_synchronisation(name, photos):
    processor = PROCESSORS[name]()
    images = [photo.to(CUDA) for photo in photos]
    processor.on_device(images)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        processor.on_device(images, dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cost_per_image(photos):
    images = [photo.to(CUDA) for photo in photos * 4]  # 64 photographs
    for name, make in PROCESSORS.items():
        processor = make()
        processor.on_device(images, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            processor.on_device(images, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        per_image = (time.perf_counter() - start) / 3 / len(images) * 1e3
        print(f"FIGURES device path {name}: {per_image:.3f} ms per image (a pack of {len(images)} photographs, "
              f"bfloat16 patches)")
        assert per_image < 1.0, f"{name}: {per_image:.2f} ms per image, slower than the CPU path's few ms per file"
