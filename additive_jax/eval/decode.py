"""Decoding with a preallocated KV cache: greedy or sampled, until EOS, a stop string or a budget.

    texts = generate(model, variables, tokenizer, ['Review: a fine film\\nSentiment:'],
                     max_new_tokens=32, chat=False, sampling=Sampling(temperature=0.7, top_p=0.9))

The prompts are tokenized (through the tokenizer's chat template when `chat`)
and left-padded to a common length, so that every row writes its next token
into the same cache slot; positions count real tokens only (as transformers'
`generate` does), so a padded row decodes exactly as it would alone. One jitted
prefill reads the prompts (vectors a method prepends enter here, once), then
one jitted decode step per token. Every method decodes this way: a prefix's
slots come before the cache's, the ladder's side network keeps a cache of its
own (`Llama.init_cache`).

With `adapter_ids` (one per prompt), `variables['peft']` is a stack of adapters
(`aj.peft.stack`) and every row runs its own, in the same calls
(`peft.stack.apply_mixed`).

On a CPU, a base stored in bf16 and computed in fp32 is widened to fp32 once
for the decode (`_widened`: XLA:CPU would widen every weight at every step).

Every host input (the prompts' tokens and mask, the adapter ids, the seed) is
placed on the device explicitly, once, and the cache is made on the device, so
a decode step moves nothing from the host but what it must: with the weights
already there (`aj.load_model` places them), nothing at all
(`jax.transfer_guard_host_to_device('disallow')` holds around the loop).

A row stops at an EOS token, at the first `stop` string in its text (which is
cut there and not returned) or after `max_new_tokens`. `on_text(row, text)`
receives each row's text as it grows (a stop string's possible beginning held
back until it is known not to be one), for streaming.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from additive_jax.eval.sampling import Sampling, next_tokens
from additive_jax.model.llama import Llama
from additive_jax.peft.merge import inference_form
from additive_jax.peft.stack import apply_per_row, rows_of


def _forward(model, variables, per_row: bool, tokens, **kwargs):
  """`model.apply`, or with `per_row` each row's own adapter leaves (`rows_of`)."""
  if not per_row:
    return model.apply(variables, tokens, **kwargs)
  return apply_per_row(model, variables['params'], variables['peft'], tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'per_row'),
                   donate_argnames='cache')
def _prefill(model: Llama, sampling: Sampling, per_row: bool, variables, tokens_BT, mask_BT, cache,
             key):
  positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
  last_B1 = jnp.full((tokens_BT.shape[0], 1), tokens_BT.shape[1] - 1, jnp.int32)  # left-padded
  logits_B1V, cache = _forward(model, variables, per_row, tokens_BT, attention_mask=mask_BT,
                               positions=positions_BT, cache=cache, logits_at=last_B1)
  key, draw = jax.random.split(key)
  return next_tokens(logits_B1V[:, -1], draw, sampling), positions_BT[:, -1] + 1, cache, key


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'per_row'),
                   donate_argnames='cache')
def _decode_step(model: Llama, sampling: Sampling, per_row: bool, variables, token_B, position_B,
                 cache, key):
  logits_B1V, cache = _forward(model, variables, per_row, token_B[:, None],
                               attention_mask=jnp.ones_like(token_B, bool)[:, None],
                               positions=position_B[:, None], cache=cache)
  key, draw = jax.random.split(key)
  return next_tokens(logits_B1V[:, -1], draw, sampling), position_B + 1, cache, key


def _widened(model: Llama, variables):
  """On a CPU, bf16-stored base weights widened to fp32 once, for the whole decode. XLA:CPU
  converts a bf16 weight to fp32 before every product, so a decode step, which reads each
  weight once, ran about 7x slower from bf16 than from fp32; the cost is the fp32 copy's
  memory while decoding. Computing in bf16 too (`dtype`) is left as it is."""
  if model.config.param_dtype != jnp.bfloat16 or model.config.dtype != jnp.float32:
    return model, variables
  return (Llama(model.config.replace(param_dtype=jnp.float32), peft=model.peft),
          {**variables, 'params': _to_fp32(variables['params'])})


@jax.jit  # one program per tree structure, compiled once, not a new lambda at every decode
def _to_fp32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(model: Llama, batch: int, max_tokens: int):
  """`model.init_cache`, made on the device (eagerly, each zero would come from the host)."""
  return model.init_cache(batch, max_tokens)


_BUCKET = 64  # prompts left-padded to a multiple of this: a few compiled shapes, not one a length


def _bucketed(model: Llama, length: int, max_new_tokens: int) -> int:
  """The prompt length rounded up to a multiple of `_BUCKET` where the model's positions allow:
  each new (rows, length) would compile the prefill and the decode step again (seconds each),
  and an evaluation decodes batch after batch of prompts of every length."""
  extra = model.num_virtual_tokens + sum(m.num_prefix_positions for m in model.peft)
  room = model.config.max_position_embeddings - max_new_tokens - extra
  return max(length, min(-(-length // _BUCKET) * _BUCKET, room))


def check_length(model: Llama, prompt_tokens: int, max_new_tokens: int) -> None:
  """Refuses a prompt and budget the model's positions cannot hold."""
  extra = model.num_virtual_tokens + sum(m.num_prefix_positions for m in model.peft)
  needed = prompt_tokens + max_new_tokens + extra
  if needed > model.config.max_position_embeddings:
    raise ValueError(f'a prompt of {prompt_tokens} tokens and {max_new_tokens} new ones'
                     + (f' (+ {extra} prompt vectors and prefix positions)' if extra else '') +
                     f' need {needed} positions; the model has '
                     f'max_position_embeddings={model.config.max_position_embeddings}')


def generate_ids(model: Llama, variables, prompt_ids: Sequence[list[int]], *, max_new_tokens: int,
                 eos_ids: Sequence[int] = (), sampling: Sampling = Sampling(), adapter_ids=None,
                 pad_id: int = 0, on_tokens: Callable | None = None) -> list[list[int]]:
  """The new tokens of each prompt (EOS not included), stopping a row at an EOS or when
  `on_tokens(row, tokens)` returns True, all rows after `max_new_tokens`."""
  if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
    raise ValueError('every prompt needs at least one token')
  if adapter_ids is not None and len(adapter_ids) != len(prompt_ids):
    raise ValueError(f'{len(adapter_ids)} adapter ids for {len(prompt_ids)} prompts')
  length = max(map(len, prompt_ids))
  check_length(model, length, max_new_tokens)
  length = _bucketed(model, length, max_new_tokens)
  model, variables = inference_form(model, variables)
  if jax.default_backend() == 'cpu':
    model, variables = _widened(model, variables)
  tokens = np.full((len(prompt_ids), length), pad_id, np.int32)
  mask = np.zeros((len(prompt_ids), length), bool)
  for row, ids in enumerate(prompt_ids):
    tokens[row, length - len(ids):], mask[row, length - len(ids):] = ids, True
  per_row = adapter_ids is not None
  if per_row:  # each row's adapter leaves, gathered once for every step
    variables = {'params': variables['params'], 'peft': jax.jit(rows_of)(
        variables['peft'], jax.device_put(np.asarray(adapter_ids, np.int32)))}
  cache = _empty_cache(model, len(prompt_ids), length + max_new_tokens)
  key = jax.random.key(jax.device_put(np.uint32(sampling.seed)))
  token_B, position_B, cache, key = _prefill(model, sampling, per_row, variables,
                                             jax.device_put(tokens), jax.device_put(mask), cache,
                                             key)
  out = [[] for _ in prompt_ids]
  done = np.zeros(len(prompt_ids), bool)
  eos = set(eos_ids)
  for step in range(max_new_tokens):
    new = np.asarray(token_B)
    for row in np.flatnonzero(~done):
      if int(new[row]) in eos:
        done[row] = True
        continue
      out[row].append(int(new[row]))
      if on_tokens is not None and on_tokens(row, out[row]):
        done[row] = True
    if done.all() or step == max_new_tokens - 1:
      break
    token_B, position_B, cache, key = _decode_step(model, sampling, per_row, variables, token_B,
                                                   position_B, cache, key)
  return out


class _StopStrings:
  """Each row's text as it grows: cut at the first stop string, streamed without any tail
  that could still become one."""

  def __init__(self, tokenizer, rows: int, stop: Sequence[str], on_text: Callable | None):
    self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
    self.texts, self.sent = [''] * rows, [0] * rows
    self.hold = max((len(s) - 1 for s in self.stop), default=0)

  def __call__(self, row: int, tokens: list[int]) -> bool:
    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
    found = [text.index(s) for s in self.stop if s in text]
    if found:
      text = text[:min(found)]
    self.texts[row] = text
    ready = len(text) if found else max(len(text) - self.hold, self.sent[row])
    if self.on_text is not None and ready > self.sent[row]:
      self.on_text(row, text[self.sent[row]:ready])
    self.sent[row] = max(self.sent[row], ready)
    return bool(found)

  def finish(self) -> list[str]:
    if self.on_text is not None:
      for row, text in enumerate(self.texts):
        if len(text) > self.sent[row]:
          self.on_text(row, text[self.sent[row]:])
    return self.texts


def prompt_token_ids(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
  """The prompts' ids: as the user turn of the chat template (with the assistant's header
  after it) when `chat`, else the text as it is (no special tokens added)."""
  if chat:
    prompts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
  return [tokenizer(p, add_special_tokens=False)['input_ids'] for p in prompts]


def generate(model: Llama, variables, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             chat: bool = True, sampling: Sampling = Sampling(), stop: Sequence[str] = (),
             adapter_ids=None, on_text: Callable | None = None) -> list[str]:
  """Completions of `prompts` (see the module docstring)."""
  streams = _StopStrings(tokenizer, len(prompts), stop, on_text)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  generate_ids(model, variables, prompt_token_ids(tokenizer, prompts, chat),
               max_new_tokens=max_new_tokens, eos_ids=[tokenizer.eos_token_id], sampling=sampling,
               adapter_ids=adapter_ids, pad_id=pad, on_tokens=streams)
  return streams.finish()
