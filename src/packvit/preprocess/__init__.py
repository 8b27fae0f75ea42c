"""Image processors of each model family, reproduced exactly, producing packed input directly.

``load_processor(checkpoint_or_model)`` gives the family's processor with the checkpoint's settings,
called the same way for every family: ``processor(images, videos, *, max_num_patches, native,
backend) -> PackedBatch``, or in two stages, ``processor.resize(...) -> PixelBatch`` (uint8) and
``processor.normalize(pixels, device=, dtype=) -> PackedBatch`` (``packvit.preprocess.processor``).
``open_image(path_or_bytes)`` is the package's one image-file opener (``ImageReadError`` with a
``status`` for every way a file fails). One module per family (``siglip2``, ``dinov3``, ``aimv2``,
``llava_vit``) holds its processor and functions, plus ``clip`` (the CLIP processor shared by AIMv2
and OneVision), ``common`` (image inputs, RGB conversion, argument checks, normalisation),
``reading`` (image files) and ``pixels`` (the two stages' hand-over).
"""

from .pixels import PixelBatch
from .processor import Processor, load_processor
from .reading import ImageReadError, open_image

__all__ = ["Processor", "load_processor", "PixelBatch", "open_image", "ImageReadError"]
