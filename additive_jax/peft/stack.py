"""Many adapters in one batch: adapters of one method set stacked, each row naming its own.

    methods, stacked = aj.peft.stack([(methods_a, peft_a), (methods_b, peft_b)], config)
    model = aj.Llama(config, peft=methods)
    logits = apply_mixed(model, {'params': params, 'peft': stacked}, adapter_ids_B, tokens_BT)

`stack` puts each adapter in its inference form (`Method.fold`) and stacks the
leaves on a new leading axis, A adapters deep. The adapters must share their
method set (the same keys) and, per method, all that makes the leaves compute
one function (LoRA's targets; a bottleneck's placement, activation and scale);
widths may differ and are zero-padded to the largest, which is exact (LoRA's
α/r is folded into B first; a bottleneck's extra units read and write zero):
`Method.stack_with` and `Method.widen`.

`apply_mixed` computes the whole batch in one call: each row's leaves are
gathered from the stack by its adapter id (`rows_of`) and the model is vmapped
over the rows (`apply_per_row`), so the frozen weights are read once for the
batch while every row runs its own adapter; no loop and no sub-batch per
adapter. It takes and returns a `KVCache` the same way; a decoder gathers the
rows' leaves once and calls `apply_per_row` at every step.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from additive_jax.model.kv_cache import KVCache
from additive_jax.peft.base import Method


def stack(adapters: Sequence[tuple[Sequence[Method], dict]], config) -> tuple[tuple, dict]:
  """(the stack's methods, {key: leaves [A, ...]}) of `adapters`, a sequence of
  (methods, peft tree), for the base `config`."""
  if not adapters:
    raise ValueError('stack needs at least one adapter')
  folded = []
  for methods, peft in adapters:
    pairs = [m.fold(peft[m.key], config) for m in methods]
    folded.append({m.key: (m, tree) for m, tree in pairs})
  keys = list(folded[0])
  for index, adapter in enumerate(folded[1:], start=1):
    if sorted(adapter) != sorted(keys):
      raise ValueError(f'adapter {index} has the methods {sorted(adapter)}, adapter 0 '
                       f'{sorted(keys)}: a stack holds adapters of one method set')
  methods, stacked = [], {}
  for key in keys:
    first, *rest = [adapter[key][0] for adapter in folded]
    wide = first.stack_with(rest, config)
    trees = [adapter[key][0].widen(adapter[key][1], wide, config) for adapter in folded]
    methods.append(wide)
    stacked[key] = jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(x) for x in leaves]),
                                *trees)
  return tuple(methods), stacked


def _cache_axes(cache: KVCache) -> KVCache:
  """Where each cache leaf keeps its batch axis (None: shared by the rows)."""
  return cache.replace(k_LBSKH=1, v_LBSKH=1, valid_BS=0, end=None,
                       methods=jax.tree.map(lambda _: 1, cache.methods))


def _one_row(cache: KVCache, expand) -> KVCache:
  """A vmapped row's cache with its batch axis of one put back (`expand`) or taken out."""
  if expand:
    add = lambda x, axis: jnp.expand_dims(x, axis)
  else:
    add = lambda x, axis: jnp.squeeze(x, axis)
  return cache.replace(k_LBSKH=add(cache.k_LBSKH, 1), v_LBSKH=add(cache.v_LBSKH, 1),
                       valid_BS=add(cache.valid_BS, 0),
                       methods=jax.tree.map(lambda x: add(x, 1), cache.methods))


def rows_of(stacked_peft, adapter_ids_B):
  """Each row's leaves, [B, ...], gathered from the stack [A, ...] by its adapter id."""
  return jax.tree.map(lambda stacked: stacked[adapter_ids_B], stacked_peft)


def apply_mixed(model, variables, adapter_ids_B, tokens_BT, attention_mask=None, positions=None,
                cache: KVCache | None = None, logits_at=None):
  """`model.apply` where row b runs adapter `adapter_ids_B[b]` of the stack in
  `variables['peft']`; returns logits [B, T, V] ([B, M, V] at `logits_at`) and the cache,
  given one."""
  return apply_per_row(model, variables['params'], rows_of(variables['peft'], adapter_ids_B),
                       tokens_BT, attention_mask, positions, cache, logits_at)


def apply_per_row(model, params, peft_B, tokens_BT, attention_mask=None, positions=None,
                  cache: KVCache | None = None, logits_at=None):
  """`model.apply` where row b runs the leaves `peft_B[..][b]` (from `rows_of`)."""
  inputs = {'attention_mask': attention_mask, 'positions': positions, 'logits_at': logits_at}
  given = {name: value for name, value in inputs.items() if value is not None}

  def row(peft, tokens_T, given_T, row_cache):
    extra = {name: value[None] for name, value in given_T.items()}
    if row_cache is None:
      return model.apply({'params': params, 'peft': peft}, tokens_T[None], **extra)[0]
    logits, row_cache = model.apply({'params': params, 'peft': peft}, tokens_T[None], **extra,
                                    cache=_one_row(row_cache, expand=True))
    return logits[0], _one_row(row_cache, expand=False)

  if cache is None:
    return jax.vmap(lambda p, t, g: row(p, t, g, None))(peft_B, tokens_BT, given)
  axes = _cache_axes(cache)  # the call fills the cache: the one it returns is not fresh
  return jax.vmap(row, in_axes=(0, 0, 0, axes), out_axes=(0, axes.replace(fresh=False)))(
      peft_B, tokens_BT, given, cache)
