"""Helpers shared by the per-family CPU parity tests."""

import torch


def write_variant_checkpoints(adapter, root, variants: dict) -> dict:
    """One random reference checkpoint per variant (``{name: write_random_checkpoint options}``)."""
    return {name: adapter.write_random_checkpoint(root / name, seed=i, **options)
            for i, (name, options) in enumerate(variants.items())}


def load_model_pairs(adapter, checkpoints: dict) -> dict:
    """``{name: (reference, packed)}`` in float32 on the CPU."""
    cpu = torch.device("cpu")
    return {name: (adapter.load_reference(path, cpu, torch.float32), adapter.load_packed(path, cpu, torch.float32))
            for name, path in checkpoints.items()}


def max_diffs(reference, packed):
    """Largest |reference - packed| over the items' tokens, and over their pooled vectors (None when
    the reference has none, in which case packvit must have none either)."""
    tokens = max((r.tokens - p.tokens).abs().max().item() for r, p in zip(reference, packed))
    if reference[0].pooled is None:
        assert all(p.pooled is None for p in packed)
        return tokens, None
    pooled = max((r.pooled - p.pooled).abs().max().item() for r, p in zip(reference, packed))
    return tokens, pooled


def import_timm():
    """timm itself, or a skip when it is not installed.

    timm imports torchvision at import time, and torchvision's wheels for this CPU build of torch
    are CUDA builds; where torchvision is missing, a stand-in answers timm's imports of it (timm's
    registry and ``create_model``, all that packvit's registration touches, never call it).
    """
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    from unittest import mock

    import pytest

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm

    class TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = mock.MagicMock(name=spec.name)
            module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
            return module

        def exec_module(self, module):
            pass

    finder = TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


def reference_processor(name: str, backend: str):
    """transformers' image processor class ``name`` (e.g. ``"CLIPImageProcessor"``) for a backend.

    transformers 5 names the PIL class ``{name}Pil`` and the torchvision one ``{name}``; 4.x names
    the PIL (numpy) class ``{name}`` and the torchvision one ``{name}Fast``. Skips where the class
    is missing.
    """
    import pytest

    transformers = pytest.importorskip("transformers")
    five = int(transformers.__version__.split(".")[0]) >= 5
    class_name = {("pil", True): f"{name}Pil", ("torch", True): name, ("pil", False): name,
                  ("torch", False): f"{name}Fast"}[(backend, five)]
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    return getattr(transformers, class_name)


REFERENCE_CLASSES = {"siglip2": "Siglip2VisionModel", "dinov3": "DINOv3ViTModel", "aimv2": "Aimv2VisionModel"}


def require_references(*families: str) -> None:
    """Skips unless the installed transformers has the reference of every family named (OneVision's
    reference is packvit's own and needs nothing)."""
    import importlib.util

    import pytest

    needed = [REFERENCE_CLASSES[f] for f in families if f in REFERENCE_CLASSES]
    if not needed:
        return
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("the references need transformers (pip install 'packvit[align]')")
    import transformers

    missing = [name for name in needed if not hasattr(transformers, name)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {', '.join(missing)}")
