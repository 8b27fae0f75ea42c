"""Image processors of each model family, reproduced exactly, producing packed input directly.

``load_processor(checkpoint_or_model)`` gives the family's processor with the checkpoint's settings,
called the same way for every family: ``processor(images, videos, *, max_num_patches, native,
backend) -> PackedBatch`` (``packvit.preprocess.processor``). One module per family (``siglip2``,
``dinov3``, ``aimv2``, ``llava_vit``) holds its processor and functions, plus ``clip`` (the CLIP
processor shared by AIMv2 and OneVision) and ``common`` (image inputs, RGB conversion and
normalisation).
"""

from .processor import Processor, load_processor

__all__ = ["Processor", "load_processor"]
