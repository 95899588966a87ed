"""Packed segments, padding and the KV cache give the logits of the plain forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model.kv_cache import KVCache
from additive_jax.model.llama import Llama
from conftest import TINY as CONFIG

V = CONFIG.vocab_size


@pytest.fixture(scope='module')
def variables():
  return Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def forward(variables, tokens, **kwargs):
  return np.asarray(Llama(CONFIG).apply(variables, jnp.asarray(tokens), **kwargs))


def test_packed_segments_equal_each_segment_alone(variables):
  rng = np.random.RandomState(0)
  first, second = rng.randint(0, V, 7), rng.randint(0, V, 5)
  packed = np.concatenate([first, second, [0, 0]])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  positions = np.array([list(range(7)) + list(range(5)) + [0, 1]])
  out = forward(variables, packed, segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions))
  alone_first = forward(variables, first[None])
  alone_second = forward(variables, second[None])
  np.testing.assert_allclose(out[0, :7], alone_first[0], rtol=0, atol=1e-5 * np.abs(alone_first).max())
  np.testing.assert_allclose(out[0, 7:12], alone_second[0], rtol=0,
                             atol=1e-5 * np.abs(alone_second).max())


def test_segments_change_the_answer_when_ignored(variables):
  """The packing test above must be able to fail: without segment ids the second segment differs."""
  rng = np.random.RandomState(0)
  first, second = rng.randint(0, V, 7), rng.randint(0, V, 5)
  packed = np.concatenate([first, second])[None]
  alone_second = forward(variables, second[None])
  assert np.abs(forward(variables, packed)[0, 7:] - alone_second[0]).max() > 1e-3


def test_kv_cache_decoding_equals_full_forward(variables):
  tokens = np.random.RandomState(1).randint(0, V, (2, 9))
  full = forward(variables, tokens)
  model = Llama(CONFIG)
  cache = KVCache.create(CONFIG, 2, 12)
  logits, cache = model.apply(variables, jnp.asarray(tokens[:, :5]), cache=cache)
  steps = [np.asarray(logits)]
  for t in range(5, 9):
    logits, cache = model.apply(variables, jnp.asarray(tokens[:, t:t + 1]), cache=cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0,
                             atol=1e-5 * np.abs(full).max())
  assert int(cache.end) == 9


def test_left_padding_with_positions_equals_unpadded(variables):
  """Generation left-pads prompts and counts positions over real tokens only."""
  tokens = np.random.RandomState(2).randint(0, V, (1, 6))
  padded = np.concatenate([[[0, 0, 0]], tokens], axis=1)
  mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  out = forward(variables, padded, attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
  alone = forward(variables, tokens)
  np.testing.assert_allclose(out[:, 3:], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_jit_and_eager_agree(variables):
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, V, (2, 8)))
  model = Llama(CONFIG)
  eager = model.apply(variables, tokens)
  jitted = jax.jit(model.apply)(variables, tokens)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0,
                             atol=1e-5 * float(jnp.abs(eager).max()))


def test_causal_future_tokens_do_not_change_the_past(variables):
  tokens = np.random.RandomState(4).randint(0, V, (1, 8))
  changed = tokens.copy()
  changed[0, 4:] = (changed[0, 4:] + 7) % V
  a, b = forward(variables, tokens), forward(variables, changed)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_remat_policies_give_identical_logits(variables):
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, V, (2, 8)))
  base = Llama(CONFIG).apply(variables, tokens)
  for policy in ('full', 'dots'):
    out = Llama(CONFIG.replace(remat=policy)).apply(variables, tokens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
