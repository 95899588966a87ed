"""Choosing the next token: greedy, or a draw from softmax(logits / T) cut to the top-k and
the nucleus.

    tokens_B = next_tokens(logits_BV, key, Sampling(temperature=0.7, top_k=50, top_p=0.9))

`temperature=0` is greedy (argmax; `top_k=1` gives the same tokens). Otherwise the
logits are divided by T, every token outside the k most likely is removed
(`top_k=0`: none), then every token outside the nucleus: the smallest set of the
most likely tokens whose probability reaches `top_p` (the most likely token is
always kept; `top_p=1`: none removed). The draw is `jax.random.categorical` over
what remains, from a key split off the sampler's seed at every step, so a seed
gives the same tokens every time.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no cut
  top_p: float = 1.0        # 1: no cut
  seed: int = 0

  def __post_init__(self):
    if (not isinstance(self.temperature, numbers.Real) or isinstance(self.temperature, bool)
        or not self.temperature >= 0):
      raise ValueError(f'temperature must be a number ≥ 0 (0: greedy), got {self.temperature!r}')
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f'top_k must be an integer ≥ 0 (0: no cut), got {self.top_k!r}')
    if (not isinstance(self.top_p, numbers.Real) or isinstance(self.top_p, bool)
        or not 0 < self.top_p <= 1):
      raise ValueError(f'top_p must lie in (0, 1] (1: no cut), got {self.top_p!r}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filtered_logits(logits_BV, sampling: Sampling):
  """logits / T with the tokens outside the top-k and the nucleus set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    kept_BV = before_BV < sampling.top_p                  # the first token always
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def next_tokens(logits_BV, key, sampling: Sampling):
  """[B] int32: the next token of every row."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filtered_logits(logits_BV, sampling)).astype(jnp.int32)
