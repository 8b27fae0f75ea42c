"""``packvit embed``: images, videos and tar shards → pooled embeddings (and tokens) in shards.

The data path, one module each: ``sources`` (inputs → tasks) → ``dataset`` (decode and preprocess
in DataLoader workers, via ``decode``) → ``packer`` (packs of a token budget) → ``model`` (the
forward) → ``writer`` (shards, written exactly once) and ``manifest``; ``run`` is the loop and the
multi-GPU split, ``cli`` the command, ``bench`` the ``files`` benchmark.
"""

from .manifest import Summary
from .run import EmbedOptions, embed

__all__ = ["embed", "EmbedOptions", "Summary"]
