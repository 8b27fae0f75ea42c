"""The same input gets the same answer from every entry point: ``load_processor(...)(...)``, the
family classes, and the module-level functions share one set of argument checks, refuse images
with no pixels alike, and mark every batch with the processor that made it (``PackedBatch.origin``)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from packvit.packing import BatchOrigin
from packvit.preprocess import ImageReadError, load_processor
from packvit.preprocess.aimv2 import aimv2_pixels, aimv2_preprocess
from packvit.preprocess.common import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD
from packvit.preprocess.dinov3 import dinov3_preprocess, preprocess_fixed
from packvit.preprocess.dinov3 import preprocess_native as dinov3_native
from packvit.preprocess.llava_vit import LlavaViTProcessor, llava_vit_preprocess, preprocess_images
from packvit.preprocess.llava_vit import preprocess_native as llava_native
from packvit.preprocess.siglip2 import siglip2_images, siglip2_preprocess

CONFIGS = {
    "siglip2": {"model_type": "siglip2_vision_model", "patch_size": 16},
    "dinov3": {"model_type": "dinov3_vit", "patch_size": 16},
    "aimv2": {"model_type": "aimv2_vision_model", "is_native": True, "patch_size": 14},
    "llava_vit": {"model_type": "onevision_encoder", "patch_size": 14, "image_size": 448},
}
NORMALISATION = {"siglip2": (HALF_MEAN, HALF_STD), "dinov3": (IMAGENET_MEAN, IMAGENET_STD),
                 "aimv2": (CLIP_MEAN, CLIP_STD), "llava_vit": (CLIP_MEAN, CLIP_STD)}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """Every family's processor from a checkpoint folder, in each backend and mode it has."""
    root = tmp_path_factory.mktemp("checkpoints")
    loaded = {}
    for family, config in CONFIGS.items():
        (root / family).mkdir()
        (root / family / "config.json").write_text(json.dumps(config))
        processor = load_processor(root / family)
        for backend in processor.backends:
            for native in ((False, True) if family in ("dinov3", "llava_vit") else (None,)):
                loaded[f"{family} {backend} native={native}"] = (
                    lambda images, p=processor, b=backend, n=native: p(images, backend=b, native=n))
    return loaded


MODULE_FUNCTIONS = {
    "siglip2_preprocess torch": lambda images: siglip2_preprocess(images),
    "siglip2_preprocess pil": lambda images: siglip2_preprocess(images, backend="pil"),
    "siglip2_images": lambda images: siglip2_images(images),
    "dinov3_preprocess": lambda images: dinov3_preprocess(images),
    "dinov3_preprocess native": lambda images: dinov3_preprocess(images, native=True),
    "dinov3 preprocess_fixed": lambda images: preprocess_fixed(images),
    "dinov3 preprocess_native": lambda images: dinov3_native(images),
    "aimv2_preprocess": lambda images: aimv2_preprocess(images),
    "aimv2_preprocess torch": lambda images: aimv2_preprocess(images, backend="torch"),
    "aimv2_preprocess native": lambda images: aimv2_preprocess(images, native=True),
    "aimv2_pixels": lambda images: aimv2_pixels(images),
    "llava_vit_preprocess": lambda images: llava_vit_preprocess(images),
    "llava_vit_preprocess torch": lambda images: llava_vit_preprocess(images, backend="torch"),
    "llava_vit_preprocess native": lambda images: llava_vit_preprocess(images, native=True),
    "llava_vit preprocess_images": lambda images: preprocess_images(images),
    "llava_vit preprocess_native": lambda images: llava_native(images),
}


def empty_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


EMPTY_IMAGES = {
    "0x0 array": (np.zeros((0, 0, 3), np.uint8), r"images \(an array of shape \(0, 0, 3\)\) is 0x0 pixels"),
    "0x7 array": (np.zeros((0, 7, 3), np.uint8), r"images \(an array of shape \(0, 7, 3\)\) is 0x7 pixels"),
    "7x0 grey array": (np.zeros((7, 0), np.uint8), r"images \(an array of shape \(7, 0\)\) is 7x0 pixels"),
    "0x5 tensor": (torch.zeros(3, 0, 5, dtype=torch.uint8), r"images \(a tensor of shape \(3, 0, 5\)\) is 0x5 pixels"),
    "5x0 PIL image": (Image.new("RGB", (0, 5)), r"images \(a PIL image\) is 5x0 pixels"),
    "0-pixel PNG": (empty_png(0, 4), r"image file of \d+ bytes: a PNG of 0x4 pixels has no pixels"),
}


@pytest.mark.parametrize("empty", EMPTY_IMAGES)
def test_images_with_no_pixels_are_refused_by_every_entry_point(processors, empty):
    image, message = EMPTY_IMAGES[empty]
    for name, process in {**processors, **MODULE_FUNCTIONS}.items():
        with pytest.raises(ValueError, match=message) as error:
            process(image)
        if empty == "0-pixel PNG":
            assert isinstance(error.value, ImageReadError) and error.value.status == "empty", name
    in_a_list = [np.zeros((20, 20, 3), np.uint8), image]
    for process in (siglip2_preprocess, dinov3_preprocess, llava_vit_preprocess):
        with pytest.raises(ValueError, match=message.replace("images ", r"images\[1\] ") if "file" not in message else message):
            process(in_a_list)


BAD_ARGUMENTS = [
    (lambda image: dinov3_preprocess(image, native="False"), r"native must be True, False or None, got 'False'"),
    (lambda image: aimv2_preprocess(image, native="False"), r"native must be True, False or None, got 'False'"),
    (lambda image: aimv2_pixels(image, native=1), r"native must be True, False or None, got 1"),
    (lambda image: llava_vit_preprocess(image, native="yes"), r"native must be True, False or None, got 'yes'"),
    (lambda image: siglip2_preprocess(image, max_num_patches=2.5), r"max_num_patches must be at least 1 .* got 2.5"),
    (lambda image: siglip2_images(image, max_num_patches=True), r"max_num_patches must be at least 1 .* got True"),
    (lambda image: dinov3_native(image, max_num_patches=0), r"max_num_patches must be at least 1 .* got 0"),
    (lambda image: llava_native(image, max_num_patches=-4), r"max_num_patches must be at least 1 .* got -4"),
    (lambda image: siglip2_preprocess(image, patch_size=0), r"patch_size must be a positive integer .* got 0"),
    (lambda image: dinov3_preprocess(image, patch_size=0), r"patch_size must be a positive integer .* got 0"),
    (lambda image: dinov3_native(image, patch_size=2.0), r"patch_size must be a positive integer .* got 2.0"),
    (lambda image: llava_native(image, patch_size=0), r"patch_size must be a positive integer .* got 0"),
    (lambda image: siglip2_preprocess(image, backend="cv2"), r"backend must be one of \('torch', 'pil'\)"),
    (lambda image: aimv2_preprocess(image, 230), r"image_size must be a positive multiple of the patch size 14"),
    (lambda image: aimv2_preprocess(image, resample="nearest"), r"unsupported resample 'nearest'"),
    (lambda image: preprocess_images(image, size=300), r"image size \(300, 300\) must be a multiple of the patch size"),
    (lambda image: siglip2_preprocess(image, alpha="keep"), r"alpha must be one of \('reference', 'drop', 'white'\)"),
    (lambda image: dinov3_preprocess(image, jpeg_draft=0.5), r"jpeg_draft must be None .* or a number >= 1"),
]


@pytest.mark.parametrize("call, message", BAD_ARGUMENTS)
def test_module_functions_check_their_arguments_as_the_processor_does(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.zeros((40, 40, 3), np.uint8))


def test_every_batch_says_which_processor_made_it(processors):
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for name, process in processors.items():
        family = name.split()[0]
        assert process(image).origin == BatchOrigin(family, *NORMALISATION[family]), name
    for name, process in MODULE_FUNCTIONS.items():
        batch = process(image)
        if not isinstance(batch, (list, torch.Tensor)):
            family = name.split("_preprocess")[0]
            assert batch.origin == BatchOrigin(family, *NORMALISATION[family]), name
    video = llava_vit_preprocess(videos=[[image, image]])
    assert video.origin == BatchOrigin("llava_vit", CLIP_MEAN, CLIP_STD)
    custom = LlavaViTProcessor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # a preprocessor_config.json's
    assert custom(image).origin == BatchOrigin("llava_vit", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
