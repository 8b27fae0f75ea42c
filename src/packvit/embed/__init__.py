"""``packvit embed``: images, videos and tar shards → pooled embeddings (and tokens) in shards.

The data path, one room per stage: ``sources`` (inputs → tasks, one reader per input kind) →
``decode`` (an image's file, a video's frames) → ``preprocess`` (the checkpoint's processor, its
uint8 first stage) → ``packer`` (packs of a token budget, and their outputs cut back per input) →
``model`` (the encode stage: a pack normalised on the model's device, forward, host outputs) →
``writer`` (shards, written exactly once). ``dataset`` runs the first four in DataLoader workers
(``make_loader``); ``gpu_decode`` is the GPU route of the decode stage (a JPEG's header parsed in
the workers, its pixels decoded by nvJPEG in the main process). ``layout`` (the folder's files and
rows) and ``manifest`` (settings, resume, summary) lie below them; ``options`` holds the settings,
``run`` the loop and the multi-GPU split, ``cli`` the command.
"""

from .manifest import RunStats, Summary
from .options import EmbedOptions
from .run import embed

__all__ = ["embed", "EmbedOptions", "Summary", "RunStats"]
