"""Classification by the log-likelihood of each label's words.

For every prompt the model scores each candidate response (e.g. " positive",
" negative") by `sum_t log p(response_t | prompt, response_<t)`, and the
prediction is the best-scoring one. When every candidate is a single token, one
forward pass per prompt suffices: the scores are read off the next-token
distribution at the prompt's last position.

Batches are right-padded to a multiple of 16 tokens so that a whole evaluation
compiles a handful of shapes, not one per length.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

_BUCKET = 16


@functools.partial(jax.jit, static_argnames='model')
def _token_logprobs(model, variables, tokens_BT, mask_BT):
  """log p(tokens[t+1] | tokens[<=t]) for every t, [B, T-1]."""
  logits_BTV = model.apply(variables, tokens_BT, attention_mask=mask_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
  return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames='model')
def _next_token_logprobs(model, variables, tokens_BT, mask_BT):
  """log p(next token | whole row) at each row's last real position, [B, V]."""
  logits_BTV = model.apply(variables, tokens_BT, attention_mask=mask_BT)
  last_B = mask_BT.sum(axis=1) - 1
  return jax.nn.log_softmax(logits_BTV[jnp.arange(tokens_BT.shape[0]), last_B], axis=-1)


def _pad(rows: list[list[int]], pad_id: int):
  length = -(-max(map(len, rows)) // _BUCKET) * _BUCKET
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def choice_logprobs(model, variables, prompt_ids: Sequence[list[int]], choice_ids: Sequence[list[int]],
                    pad_id: int, batch_size: int = 32, progress: bool = False) -> np.ndarray:
  """[len(prompt_ids), len(choice_ids)] summed log-probabilities of each choice after each prompt."""
  if all(len(ids) == 1 for ids in choice_ids):
    columns = [ids[0] for ids in choice_ids]
    scores = []
    for start in tqdm.tqdm(range(0, len(prompt_ids), batch_size), desc='scoring', disable=not progress):
      tokens, mask = _pad(prompt_ids[start:start + batch_size], pad_id)
      scores.append(np.asarray(_next_token_logprobs(model, variables, tokens, mask))[:, columns])
    return np.concatenate(scores).astype(np.float64)
  # Multi-token choices: one row per (prompt, choice), scored over the choice's positions.
  rows = [(i, c, p + ids, len(p)) for i, p in enumerate(prompt_ids) for c, ids in enumerate(choice_ids)]
  scores = np.zeros((len(prompt_ids), len(choice_ids)), np.float64)
  for start in tqdm.tqdm(range(0, len(rows), batch_size), desc='scoring', disable=not progress):
    batch = rows[start:start + batch_size]
    tokens, mask = _pad([seq for _, _, seq, _ in batch], pad_id)
    logp = np.asarray(_token_logprobs(model, variables, tokens, mask))
    for row, (i, c, seq, prompt_len) in enumerate(batch):
      scores[i, c] = logp[row, prompt_len - 1:len(seq) - 1].sum()
  return scores
