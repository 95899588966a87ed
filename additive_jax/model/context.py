"""What every layer of one call shares: rotary tables, the attention's segments or mask, and
where each token stands among its sequence's real tokens.

`Llama.__call__` builds one `AttentionContext` per call (`call_context`) and broadcasts it
through the layer scan. Besides what attention reads, it says for each slot

  token_index_BT   its index among the real tokens of its sequence (its packed segment),
                   counted from the first; with a cache, the cached tokens count too.
                   −1 for padding and for vectors a method prepends.
  tokens_after_BT  how many real tokens of its segment follow it in this call; None in a
                   decoding step after the prefill, whose tokens follow the prompt.

Both are None unless a method of the call asks for them (`Hooks.wants_token_order`), so
no other method's step or decoding computes them.

Methods that act at positions counted from a sequence's start or end (ReFT) read them, so a
left-padded row, a packed segment and a row alone give the same positions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from additive_jax.model.config import LlamaConfig
from additive_jax.model.rope import rotary_tables

_LARGE = 2**30  # tokens_after of a slot that is no real token: past every suffix


@flax.struct.dataclass
class AttentionContext:
  """Per-call tensors every layer shares (broadcast through the layer scan), and the config.

  Without a cache, attention is `attention.attend` over the segment ids (each
  implementation builds its mask itself, none crosses the scan); with one, the
  decoding step's explicit mask over the cache slots."""
  positions_BT: jax.Array
  cos_BTH: jax.Array
  sin_BTH: jax.Array
  segment_ids_BT: jax.Array | None  # no cache: packed segments (0 padding), virtual slots first
  mask_BTS: jax.Array | None        # with a cache: True where query t may attend key slot s
  cache_end: jax.Array | None
  token_index_BT: jax.Array | None
  tokens_after_BT: jax.Array | None
  config: LlamaConfig = flax.struct.field(pytree_node=False)  # static; the ladder's side net
  num_prefix: int = flax.struct.field(pytree_node=False, default=0)
  num_virtual: int = flax.struct.field(pytree_node=False, default=0)


def _index_in_run(segments_BT):
  """Each real slot's index within its run of equal, non-zero segment ids (0: padding);
  −1 for padding."""
  real_BT = segments_BT != 0
  before_BT = jnp.cumsum(real_BT, axis=1) - real_BT  # real slots before t
  previous_BT = jnp.pad(segments_BT[:, :-1], ((0, 0), (1, 0)))
  starts_BT = real_BT & (segments_BT != previous_BT)
  start_count_BT = jax.lax.cummax(jnp.where(starts_BT, before_BT, 0), axis=1)
  return jnp.where(real_BT, before_BT - start_count_BT, -1).astype(jnp.int32)


def token_order(segments_BT, virtual: int, cached_B=None, decoding: bool = False):
  """(token_index_BT, tokens_after_BT) of a call whose slots carry `segments_BT` (0 padding,
  the first `virtual` slots prepended vectors); `cached_B`: real tokens already in the cache."""
  tokens_BT = segments_BT[:, virtual:]
  index_BT = _index_in_run(tokens_BT)
  if cached_B is not None:
    index_BT = jnp.where(index_BT >= 0, index_BT + cached_B[:, None], -1)
  after_BT = None
  if not decoding:
    after_BT = _index_in_run(tokens_BT[:, ::-1])[:, ::-1]
    after_BT = jnp.where(after_BT >= 0, after_BT, _LARGE)
    after_BT = jnp.pad(after_BT, ((0, 0), (virtual, 0)), constant_values=_LARGE)
  return jnp.pad(index_BT, ((0, 0), (virtual, 0)), constant_values=-1), after_BT


def call_context(cfg: LlamaConfig, positions_BT, mask_BT, segment_ids_BT, cache, virtual: int,
                 prefix: int, cached_virtual: int = 0, token_order_wanted: bool = False):
  """(the call's AttentionContext, the cache with this call's slots marked valid): rotary
  tables, and the segment ids (no cache) or the mask over the cache's slots. `virtual`: the
  vectors this call prepends; `cached_virtual`: those an earlier call put in the cache;
  `token_order_wanted`: whether to compute the token order fields."""
  cos_BTH, sin_BTH = rotary_tables(positions_BT, cfg)
  batch, length = mask_BT.shape
  if segment_ids_BT is not None and segment_ids_BT.shape[1] != length - virtual:
    raise ValueError(f'segment_ids has length {segment_ids_BT.shape[1]}, '
                     f'the tokens {length - virtual}')
  if cache is None:
    # padding is segment 0, which no token's segment sees; the virtual slots' ids are unread
    segments_BT = mask_BT.astype(jnp.int32)
    if segment_ids_BT is not None:
      segments_BT = jnp.where(mask_BT, jnp.pad(segment_ids_BT, ((0, 0), (virtual, 0)),
                                               constant_values=1), 0)
    index_BT, after_BT = token_order(segments_BT, virtual) if token_order_wanted else (None, None)
    return AttentionContext(positions_BT, cos_BTH, sin_BTH, segments_BT, None, None, index_BT,
                            after_BT, cfg, prefix, virtual), cache
  if segment_ids_BT is not None:
    raise ValueError('segment_ids (packing) cannot be combined with a KV cache')
  index_BT, after_BT = None, None
  if token_order_wanted:
    # the real tokens cached before this call: its valid slots less the prepended vectors'
    cached_B = jnp.sum(cache.valid_BS, axis=1, dtype=jnp.int32) - cached_virtual
    index_BT, after_BT = token_order(mask_BT.astype(jnp.int32), virtual, cached_B,
                                     decoding=not cache.fresh)
  valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, mask_BT, (0, cache.end))
  cache = cache.replace(valid_BS=valid_BS)
  query_slot_T = cache.end + jnp.arange(length)
  key_slot_S = jnp.arange(valid_BS.shape[1])
  mask_BTS = (key_slot_S[None, None, :] <= query_slot_T[None, :, None]) & valid_BS[:, None, :]
  if prefix:  # prefix key/value slots are visible to every position
    mask_BTS = jnp.concatenate([jnp.ones((batch, length, prefix), bool), mask_BTS], axis=-1)
  return AttentionContext(positions_BT, cos_BTH, sin_BTH, None, mask_BTS, cache.end, index_BT,
                          after_BT, cfg, prefix, virtual), cache
