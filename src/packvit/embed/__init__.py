"""``packvit embed``: images, videos and tar shards → pooled embeddings (and tokens) in shards.

The data path, one room per stage: ``sources`` (inputs → tasks, one reader per input kind) →
``decode`` (bytes → images or frames) → ``preprocess`` (the checkpoint's processor) → ``packer``
(packs of a token budget, and their outputs cut back per input) → ``model`` (the encode stage:
pack → host outputs) → ``writer`` (shards, written exactly once). ``dataset`` runs the first four
in DataLoader workers (``make_loader``); ``layout`` (the folder's files and rows) and ``manifest``
(settings, resume, summary) lie below them; ``options`` holds the settings, ``run`` the loop and the
multi-GPU split, ``cli`` the command.
"""

from .manifest import RunStats, Summary
from .options import EmbedOptions
from .run import embed

__all__ = ["embed", "EmbedOptions", "Summary", "RunStats"]
