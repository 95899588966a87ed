"""Classification by the log-likelihood of each label's words.

For every prompt the model scores each candidate response (e.g. " positive",
" negative") by `sum_t log p(response_t | prompt, response_<t)`, and the
prediction is the best-scoring one. When every candidate is a single token, one
forward pass per prompt suffices: the scores are read off the next-token
distribution at the prompt's last position.

Batches are right-padded to a multiple of 16 tokens so that a whole evaluation
compiles a handful of shapes, not one per length. With `adapter_ids` (one per
prompt), `variables['peft']` is a stack of adapters (`aj.peft.stack`) and each
prompt is scored with its own, in the same calls.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from additive_jax.peft.stack import apply_mixed

_BUCKET = 16


def _logits(model, variables, adapter_ids_B, tokens_BT, mask_BT):
  if adapter_ids_B is None:
    return model.apply(variables, tokens_BT, attention_mask=mask_BT)
  return apply_mixed(model, variables, adapter_ids_B, tokens_BT, attention_mask=mask_BT)


@functools.partial(jax.jit, static_argnames='model')
def _token_logprobs(model, variables, adapter_ids_B, tokens_BT, mask_BT):
  """log p(tokens[t+1] | tokens[<=t]) for every t, [B, T-1]."""
  logits_BTV = _logits(model, variables, adapter_ids_B, tokens_BT, mask_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
  return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames='model')
def _next_token_logprobs(model, variables, adapter_ids_B, tokens_BT, mask_BT):
  """log p(next token | whole row) at each row's last real position, [B, V]."""
  logits_BTV = _logits(model, variables, adapter_ids_B, tokens_BT, mask_BT)
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


def _ids(adapter_ids, rows) -> jnp.ndarray | None:
  return None if adapter_ids is None else jnp.asarray([adapter_ids[i] for i in rows], jnp.int32)


def choice_logprobs(model, variables, prompt_ids: Sequence[list[int]], choice_ids: Sequence[list[int]],
                    pad_id: int, batch_size: int = 32, progress: bool = False,
                    adapter_ids: Sequence[int] | None = None) -> np.ndarray:
  """[len(prompt_ids), len(choice_ids)] summed log-probabilities of each choice after each prompt."""
  if adapter_ids is not None and len(adapter_ids) != len(prompt_ids):
    raise ValueError(f'{len(adapter_ids)} adapter ids for {len(prompt_ids)} prompts')
  if all(len(ids) == 1 for ids in choice_ids):
    columns = [ids[0] for ids in choice_ids]
    scores = []
    for start in tqdm.tqdm(range(0, len(prompt_ids), batch_size), desc='scoring', disable=not progress):
      tokens, mask = _pad(prompt_ids[start:start + batch_size], pad_id)
      ids = _ids(adapter_ids, range(start, start + len(tokens)))
      scores.append(np.asarray(_next_token_logprobs(model, variables, ids, tokens, mask))[:, columns])
    return np.concatenate(scores).astype(np.float64)
  # Multi-token choices: one row per (prompt, choice), scored over the choice's positions.
  rows = [(i, c, p + ids, len(p)) for i, p in enumerate(prompt_ids) for c, ids in enumerate(choice_ids)]
  scores = np.zeros((len(prompt_ids), len(choice_ids)), np.float64)
  for start in tqdm.tqdm(range(0, len(rows), batch_size), desc='scoring', disable=not progress):
    batch = rows[start:start + batch_size]
    tokens, mask = _pad([seq for _, _, seq, _ in batch], pad_id)
    ids = _ids(adapter_ids, [i for i, _, _, _ in batch])
    logp = np.asarray(_token_logprobs(model, variables, ids, tokens, mask))
    for row, (i, c, seq, prompt_len) in enumerate(batch):
      scores[i, c] = logp[row, prompt_len - 1:len(seq) - 1].sum()
  return scores
