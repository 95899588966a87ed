"""Greedy decoding with a KV cache.

Prompts are left-padded to a common length so that every row writes its next
token into the same cache slot; positions count real tokens only (as
transformers' `generate` does), so a padded row decodes exactly as it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from additive_jax.model.llama import KVCache, Llama
from additive_jax.peft.merge import inference_form


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _greedy(model: Llama, variables, tokens_BT, mask_BT, max_new_tokens: int, eos_id: int):
  batch, length = tokens_BT.shape
  cache = KVCache.create(model.config, batch, length + max_new_tokens, model.config.dtype)
  positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
  logits_BTV, cache = model.apply(variables, tokens_BT, attention_mask=mask_BT,
                                  positions=positions_BT, cache=cache)
  next_B = jnp.argmax(logits_BTV[:, -1], axis=-1).astype(jnp.int32)
  next_position_B = positions_BT[:, -1] + 1

  def step(carry, _):
    cache, token_B, position_B, done_B = carry
    logits, cache = model.apply(variables, token_B[:, None], attention_mask=jnp.ones((batch, 1), bool),
                                positions=position_B[:, None], cache=cache)
    new_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    done_B = done_B | (token_B == eos_id)
    new_B = jnp.where(done_B, eos_id, new_B)
    return (cache, new_B, position_B + 1, done_B), token_B

  init = (cache, next_B, next_position_B, jnp.zeros((batch,), bool))
  _, out_NB = jax.lax.scan(step, init, None, length=max_new_tokens)
  return out_NB.T


def generate(model: Llama, variables, tokenizer, prompts: list[str], max_new_tokens: int = 32,
             chat: bool = True) -> list[str]:
  """Greedy completions of `prompts` (chat-formatted by the tokenizer's template if `chat`)."""
  model, variables = inference_form(model, variables)
  if chat:
    texts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
  else:
    texts = list(prompts)
  ids = [tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts]
  length = max(map(len, ids))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  tokens = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for row, seq in enumerate(ids):
    tokens[row, length - len(seq):] = seq
    mask[row, length - len(seq):] = 1
  out = np.asarray(_greedy(model, variables, jnp.asarray(tokens), jnp.asarray(mask),
                           max_new_tokens, tokenizer.eos_token_id))
  results = []
  for row in out:
    row = list(row)
    if tokenizer.eos_token_id in row:
      row = row[:row.index(tokenizer.eos_token_id)]
    results.append(tokenizer.decode(row, skip_special_tokens=True))
  return results
