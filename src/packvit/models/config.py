"""The configuration convention of every family: a frozen dataclass built from a ``config.json``.

A family's configuration subclasses ``VisionConfig``: its fields carry transformers' names and the
published defaults, ``model_types`` lists the ``model_type`` values it reads (``composite_types``
those whose vision tower sits under ``vision_config``), and ``check()`` adds the family's own rules
to the common ones. ``from_dict`` is the one way a checkpoint's dict becomes a configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import ClassVar

from ..layers import ACTIVATIONS

__all__ = ["VisionConfig"]


@dataclass(frozen=True)
class VisionConfig:
    """Fields every packed vision tower has; families add their own and override the defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu"

    #: the ``model_type`` values this configuration reads, the first being the one it writes
    model_types: ClassVar[tuple[str, ...]] = ()
    #: model types of composite checkpoints (vision + text) whose vision fields sit under ``vision_config``
    composite_types: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; packvit knows {sorted(ACTIVATIONS)}")
        self.check()

    def check(self) -> None:
        """The family's own rules; raises ``ValueError``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, config_dict: dict, **overrides):
        """The configuration of a ``config.json`` dict (``ValueError`` for another family's), with
        ``overrides`` replacing fields. Entries that are not fields (``architectures``, ``auto_map``,
        ``dtype`` ...) are ignored; square sizes given as pairs become ints."""
        model_type = config_dict.get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(
                f"config.json has model_type {model_type!r}, which {cls.__name__} does not read (it reads "
                f"{cls.model_types}); packvit.from_pretrained picks the family of any supported checkpoint"
            )
        if model_type in cls.composite_types:
            vision = config_dict.get("vision_config")
            if not isinstance(vision, dict):
                raise ValueError(f"this {model_type} config.json has no vision_config; it cannot describe a vision tower")
            config_dict = vision
        known = {f.name for f in fields(cls)}
        unknown_overrides = sorted(set(overrides) - known)
        if unknown_overrides:
            raise ValueError(f"{cls.__name__} has no fields {unknown_overrides}; it has {sorted(known)}")
        values = {key: value for key, value in config_dict.items() if key in known and value is not None}
        values.update(overrides)
        for name in ("patch_size", "image_size"):
            if isinstance(values.get(name), (list, tuple)):
                if len(set(values[name])) != 1:
                    raise ValueError(f"{cls.__name__} needs a square {name}, the checkpoint has {values[name]}")
                values[name] = int(values[name][0])
        return cls(**values)

    def to_dict(self) -> dict:
        """The fields and ``model_type``, as a ``config.json`` holds them."""
        return {"model_type": self.model_types[0], **dataclasses.asdict(self)}

    def replace(self, **changes):
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
