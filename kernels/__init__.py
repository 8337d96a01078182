"""Pallas kernels with their pure-JAX references, installed as ``harli_jax.kernels``.

- `paged_attention`: decode attention over K/V pages of the arena (Pallas/Triton kernel on GPU, the
  reference elsewhere); `paged_attention_pallas` and `paged_attention_reference` are the two paths.
- `ragged_paged_attention`: causal attention of mixed prefill chunks and decode tokens (queries grouped by
  sequence) over their pages; `ragged_paged_attention_pallas` and `ragged_paged_attention_reference` are
  the two paths.
- `write_kv`: one decode token's K/V per sequence into its page slot (in place when the arena is donated).
"""

from .common import MASK_VALUE
from .kv_cache import write_kv
from .paged_attention_kernel import paged_attention, paged_attention_pallas
from .ragged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_pallas,
    ragged_paged_attention_reference,
)
from .reference import paged_attention_reference

__all__ = [
    "MASK_VALUE",
    "paged_attention",
    "paged_attention_pallas",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_pallas",
    "ragged_paged_attention_reference",
    "write_kv",
]
