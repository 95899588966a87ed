"""Token cross-entropy with a float loss mask, summed (not averaged) so that
micro-batches, packed rows and devices add up to exactly the whole batch's loss.

Targets arrive already shifted (the next token) and the mask says which count:
never mask by token id, since in SmolLM2 padding and EOS share id 2 and the EOS
target must be learned.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_cross_entropy(logits_BTV, targets_BT, loss_mask_BT):
  """(Σ mask · −log p(target), Σ mask), in fp32 whatever the compute dtype."""
  mask_BT = loss_mask_BT.astype(jnp.float32)
  loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                            targets_BT)
  return jnp.sum(loss_BT * mask_BT), jnp.sum(mask_BT)
