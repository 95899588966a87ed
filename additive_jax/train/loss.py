"""Token cross-entropy with a float loss mask, summed (not averaged) so that
micro-batches, packed rows and devices add up to exactly the whole batch's loss.

Targets arrive already shifted (the next token) and the mask says which count:
never mask by token id, since in SmolLM2 padding and EOS share id 2 and the EOS
target must be learned.

No logits where no loss is taken. Instruction and classification data carry
loss on a few positions of each row (SST-2's packed rows: 11%), yet the LM head
over every position is a [B, T, V] product (V = 49,152 for SmolLM2) forward and
again for its gradient. `masked_token_loss` takes the final hidden states instead:
each row's loss positions are gathered into a static budget of `budget` slots a
row, and the head runs there alone. A batch with a row of more loss positions
than the budget is computed whole instead, by the same chunked loss over every
position, inside the same compiled step (`lax.cond`): no position is ever
dropped, and the step reports that it overflowed. Either way the logits exist a
chunk of rows at a time (`chunk_rows`), recomputed in the backward pass rather
than stored, so the [B, T, V] logits never exist whole.

A method may add a loss term of its own (`Method.extra_loss`: AdapterFusion's
regularization of its value matrices toward the identity); `methods_extra_loss` sums them,
None when no method has one, and the train step adds its gradient once a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import lm_head_logits

# Rows of logits computed at once: about 64 MiB of fp32 logits at SmolLM2's vocabulary.
_CHUNK_BYTES = 1 << 26


def token_cross_entropy(logits_BTV, targets_BT, loss_mask_BT):
  """(Σ mask · −log p(target), Σ mask), in fp32 whatever the compute dtype."""
  mask_BT = loss_mask_BT.astype(jnp.float32)
  loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                            targets_BT)
  return jnp.sum(loss_BT * mask_BT), jnp.sum(mask_BT)


def chunk_rows(vocab_size: int) -> int:
  """Positions whose logits one chunk holds: a power of two, 8…4096."""
  rows = max(8, min(4096, _CHUNK_BYTES // (4 * vocab_size)))
  return 1 << (rows.bit_length() - 1)


def chunked_cross_entropy(config: LlamaConfig, params, hidden_MD, targets_M, weights_M):
  """Σ weights · −log p(target) of M positions, the LM head applied a chunk at a time."""
  chunk = min(chunk_rows(config.vocab_size), hidden_MD.shape[0])
  pad = -hidden_MD.shape[0] % chunk
  hidden_CRD, targets_CR, weights_CR = (
      jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])
      for x in (hidden_MD, targets_M, weights_M))

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them all
  def add_chunk(total, xs):
    hidden_RD, targets_R, weights_R = xs
    loss_R = optax.softmax_cross_entropy_with_integer_labels(
        lm_head_logits(config, params, hidden_RD), targets_R)
    return total + jnp.sum(loss_R * weights_R), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32),
                          (hidden_CRD, targets_CR, weights_CR))
  return total


def loss_positions_BM(loss_mask_BT, budget: int):
  """Each row's loss positions, first to last, padded to `budget` with position 0, and how
  many each row has [B]."""
  positions_BM = jax.vmap(lambda m: jnp.nonzero(m, size=budget, fill_value=0)[0])(loss_mask_BT != 0)
  return positions_BM.astype(jnp.int32), jnp.sum(loss_mask_BT != 0, axis=1)


def masked_token_loss(config: LlamaConfig, params, hidden_BTD, targets_BT, loss_mask_BT,
                      budget: int | None):
  """(Σ mask · −log p(target), Σ mask, overflowed) from the final hidden states, the LM head
  applied at the loss positions alone (`budget` a row; None: at every position)."""
  mask_BT = loss_mask_BT.astype(jnp.float32)
  batch, length, width = hidden_BTD.shape

  def every_position():
    return chunked_cross_entropy(config, params, hidden_BTD.reshape(-1, width),
                                 targets_BT.reshape(-1), mask_BT.reshape(-1))

  if budget is None or budget >= length:
    return every_position(), jnp.sum(mask_BT), jnp.zeros((), bool)
  positions_BM, counts_B = loss_positions_BM(mask_BT, budget)
  overflowed = jnp.any(counts_B > budget)

  def loss_positions():
    take = lambda x: jnp.take_along_axis(x, positions_BM.reshape(batch, budget, *(1,) * (x.ndim - 2)),
                                         axis=1)
    kept_BM = jnp.arange(budget)[None] < counts_B[:, None]
    weights_BM = jnp.where(kept_BM, take(mask_BT), 0.0)
    return chunked_cross_entropy(config, params, take(hidden_BTD).reshape(-1, width),
                                 take(targets_BT).reshape(-1), weights_BM.reshape(-1))

  return jax.lax.cond(overflowed, every_position, loss_positions), jnp.sum(mask_BT), overflowed


def methods_extra_loss(methods, peft, step):
  """Σ of the methods' own loss terms at optimizer step `step`, or None when none has one."""
  terms = [term for m in methods if hasattr(m, 'extra_loss')
           and (term := m.extra_loss(peft[m.key], step)) is not None]
  return sum(terms) if terms else None
