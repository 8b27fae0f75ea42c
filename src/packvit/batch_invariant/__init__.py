"""Batch-invariant mode: every output of an item bit-identical whatever else is in its pack.

Packing many items into one sequence makes the kernels see the pack's total size: cuBLAS and MKL
choose their tiling and reduction order from the number of rows, CUDA's reductions their split,
some attention kernels their variant. An item's outputs then change in their last bits with its
pack-mates. ``model.batch_invariant = True`` (``from_pretrained(..., batch_invariant=True)``,
``PACKVIT_BATCH_INVARIANT=1``, ``packvit embed --batch_invariant``) runs every operation whose
result for a row could depend on other rows through a version that cannot (``ops``, on CUDA the
Triton kernels of ``kernels``), picks an attention backend that computes each segment on its own
(``INVARIANT_ATTENTION_BACKENDS``) and runs the encoder blocks eagerly, without automatic CUDA graphs.

What holds: on one machine (the same GPU model, or the CPU) and the same software (packvit,
torch, Triton, the attention kernel), an item's tokens, pooled vector, prefix tokens and hidden
states are the same bits alone, packed with any others, in any position and in packs of any size.
Gradients with respect to an item's inputs are the same bits on the CPU; parameter gradients are
sums over the pack and depend on it. What does not hold: the same bits across GPU models, between
the CPU and a GPU, or against the default mode (the kernels differ; the outputs agree to rounding).
"""

from .mode import (ENV_VAR, INVARIANT_ATTENTION_BACKENDS, NOT_INVARIANT_ATTENTION_BACKENDS, attention_backend,
                   check_model, from_environment, invariant_kernels, runs_batch_invariant, with_invariant_kernels)
from .ops import normalize_rows

__all__ = ["ENV_VAR", "INVARIANT_ATTENTION_BACKENDS", "NOT_INVARIANT_ATTENTION_BACKENDS", "from_environment",
           "attention_backend", "check_model", "invariant_kernels", "with_invariant_kernels", "runs_batch_invariant",
           "normalize_rows"]
