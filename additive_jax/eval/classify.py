"""Classification by the log-likelihood of each label's words.

For every prompt the model scores each candidate response (e.g. " positive",
" negative") by `sum_t log p(response_t | prompt, response_<t)`, and the
prediction is the best-scoring one. When every candidate is a single token, one
forward pass per prompt suffices: the scores are read off the next-token
distribution at the prompt's last position.
The LM head runs only at the positions that predict a choice's tokens
(`logits_at`), never over the whole row.

Rows are batched by length (sorted first, the scores put back in the given
order) and right-padded to a multiple of 16 tokens, so that little of a batch is
padding and a whole evaluation compiles a handful of shapes, not one per length. With `adapter_ids` (one per
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


def _logits(model, variables, adapter_ids_B, tokens_BT, mask_BT, at_BM):
  """Logits [B, M, V] at the positions `at_BM` alone: the LM head runs nowhere else."""
  if adapter_ids_B is None:
    return model.apply(variables, tokens_BT, attention_mask=mask_BT, logits_at=at_BM)
  return apply_mixed(model, variables, adapter_ids_B, tokens_BT, attention_mask=mask_BT,
                     logits_at=at_BM)


@functools.partial(jax.jit, static_argnames=('model', 'span'))
def _span_logprobs(model, variables, adapter_ids_B, tokens_BT, mask_BT, start_B, span: int):
  """log p(tokens[t+1] | tokens[<=t]) for t = start … start + span − 1 of each row, [B, span]
  (positions past the row's end read its last token: the caller sums only its own)."""
  at_BM = jnp.minimum(start_B[:, None] + jnp.arange(span), tokens_BT.shape[1] - 2)
  logp_BMV = jax.nn.log_softmax(_logits(model, variables, adapter_ids_B, tokens_BT, mask_BT, at_BM))
  next_BM = jnp.take_along_axis(tokens_BT, at_BM + 1, axis=1)
  return jnp.take_along_axis(logp_BMV, next_BM[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames='model')
def _next_token_logprobs(model, variables, adapter_ids_B, tokens_BT, mask_BT):
  """log p(next token | whole row) at each row's last real position, [B, V]."""
  last_B1 = mask_BT.sum(axis=1, keepdims=True) - 1
  return jax.nn.log_softmax(_logits(model, variables, adapter_ids_B, tokens_BT, mask_BT,
                                    last_B1)[:, 0], axis=-1)


def _pad(rows: list[list[int]], pad_id: int):
  length = -(-max(map(len, rows)) // _BUCKET) * _BUCKET
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return jax.device_put(tokens), jax.device_put(mask)  # placed explicitly, like every input


def _ids(adapter_ids, rows) -> jax.Array | None:
  return None if adapter_ids is None else jax.device_put(
      np.asarray([adapter_ids[i] for i in rows], np.int32))


def choice_logprobs(model, variables, prompt_ids: Sequence[list[int]], choice_ids: Sequence[list[int]],
                    pad_id: int, batch_size: int = 32, progress: bool = False,
                    adapter_ids: Sequence[int] | None = None) -> np.ndarray:
  """[len(prompt_ids), len(choice_ids)] summed log-probabilities of each choice after each prompt."""
  if adapter_ids is not None and len(adapter_ids) != len(prompt_ids):
    raise ValueError(f'{len(adapter_ids)} adapter ids for {len(prompt_ids)} prompts')
  if all(len(ids) == 1 for ids in choice_ids):
    columns = [ids[0] for ids in choice_ids]
    scores = np.zeros((len(prompt_ids), len(choice_ids)), np.float64)
    for rows in tqdm.tqdm(_by_length(prompt_ids, batch_size), desc='scoring', disable=not progress):
      tokens, mask = _pad([prompt_ids[i] for i in rows], pad_id)
      logp = _next_token_logprobs(model, variables, _ids(adapter_ids, rows), tokens, mask)
      scores[rows] = np.asarray(logp)[:, columns]
    return scores
  # Multi-token choices: one row per (prompt, choice), scored over the choice's positions.
  rows = [(i, c, p + ids, len(p)) for i, p in enumerate(prompt_ids) for c, ids in enumerate(choice_ids)]
  span = max(map(len, choice_ids))  # the positions that predict a choice's tokens
  scores = np.zeros((len(prompt_ids), len(choice_ids)), np.float64)
  for picked in tqdm.tqdm(_by_length([seq for _, _, seq, _ in rows], batch_size), desc='scoring',
                          disable=not progress):
    batch = [rows[k] for k in picked]
    tokens, mask = _pad([seq for _, _, seq, _ in batch], pad_id)
    ids = _ids(adapter_ids, [i for i, _, _, _ in batch])
    starts = jax.device_put(np.asarray([prompt_len - 1 for *_, prompt_len in batch], np.int32))
    logp = np.asarray(_span_logprobs(model, variables, ids, tokens, mask, starts, span))
    for row, (i, c, seq, prompt_len) in enumerate(batch):
      scores[i, c] = logp[row, :len(seq) - prompt_len].sum()
  return scores


def _by_length(sequences: Sequence[list[int]], batch_size: int) -> list[np.ndarray]:
  """Indices of `sequences` in batches of similar lengths (shortest first): a batch is padded to
  its longest row, so sorting first pads far less than batching in the given order."""
  order = np.argsort([len(seq) for seq in sequences], kind='stable')
  return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
