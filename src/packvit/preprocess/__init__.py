"""Image processors of each model family, reproduced exactly, producing packed input directly.

One module per family (``siglip2``, ``dinov3``, ``aimv2``, ``llava_vit``) plus ``clip`` (the
CLIP processor shared by AIMv2 and OneVision) and ``common`` (conversion and normalisation).
"""
