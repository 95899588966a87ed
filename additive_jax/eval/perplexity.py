"""Perplexity on the response tokens of a split, token-level and per example.

    result = perplexity(model, variables, batches)   # batches: make_eval_batches's, one example a row

Only the tokens the loss mask counts (a response's, and its EOS) are scored, as
in training. Two summaries, since they answer different questions:

  perplexity              exp(Σ NLL / Σ tokens) over the whole split: long responses weigh more
  perplexity_per_example  mean over examples of exp(an example's mean NLL): every example counts
                          once, as a per-example score in a paper's table would

Rows with no scored token (the padding rows that even out the processes'
batches) are left out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames='model')
def _row_losses(model, variables, batch):
  """(Σ NLL, scored tokens) of every row, [B] each."""
  logits_BTV = model.apply(variables, batch['tokens'], positions=batch['positions'],
                           segment_ids=batch['segment_ids'])
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           batch['targets'])
  return jnp.sum(nll_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1)


def perplexity(model, variables, batches) -> dict[str, float]:
  sums, counts = [], []
  for batch in batches:
    row_sum, row_count = _row_losses(model, variables, jax.device_put(batch))  # placed once
    sums.append(np.asarray(row_sum, np.float64))
    counts.append(np.asarray(row_count, np.float64))
  sums, counts = np.concatenate(sums), np.concatenate(counts)
  scored = counts > 0
  if not scored.any():
    raise ValueError('perplexity of a split with no scored token')
  sums, counts = sums[scored], counts[scored]
  return {'perplexity': float(np.exp(sums.sum() / counts.sum())),
          'perplexity_per_example': float(np.mean(np.exp(sums / counts))),
          'tokens': float(counts.sum()), 'examples': int(scored.sum())}
