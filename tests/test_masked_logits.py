"""No logits where no loss is taken: the gathered loss, its overflow fallback, the model's
`logits_at` / `return_hidden`, the budget a run derives from its data, and the step's FLOPs."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model.llama import Llama, lm_head_logits
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.ladder import LadderSide
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.train import flops
from additive_jax.train.loss import chunk_rows, masked_token_loss, token_cross_entropy
from additive_jax.train.loss_budget import derive_budget
from additive_jax.train.step import batch_loss
from conftest import TINY, relative_error

UNTIED = dataclasses.replace(TINY, tie_word_embeddings=not TINY.tie_word_embeddings)


def packed_batch(rng, rows=3, length=40, vocab=TINY.vocab_size):
  """Rows of three packed segments and a padded tail; loss on each segment's last few tokens,
  well under half the positions."""
  tokens = rng.randint(0, vocab, (rows, length + 1)).astype(np.int32)
  segment_ids = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  loss_mask = np.zeros((rows, length), np.float32)
  for row in range(rows):
    starts = [0, 11 + row, 23 + row, length - 4]
    for segment, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
      segment_ids[row, start:end] = segment + 1
      positions[row, start:end] = np.arange(end - start)
      loss_mask[row, end - 3:end] = 1
  loss_mask[0, 30] = 0.5  # a fractional weight counts as itself
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': loss_mask,
          'positions': positions, 'segment_ids': segment_ids}


@functools.lru_cache(maxsize=None)
def base(config):
  return nn.unbox(Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']


def moved(model, params, scale=0.3):
  """Every trainable leaf moved off its init, so the gradients are not those of a no-op."""
  peft = model.init_peft(jax.random.key(1), params)['peft']
  leaves, tree = jax.tree.flatten(peft)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def full_logits_loss(model, peft, params, batch):
  logits = model.apply({'params': params, 'peft': peft}, batch['tokens'],
                       positions=batch['positions'], segment_ids=batch['segment_ids'])
  return token_cross_entropy(logits, batch['targets'], batch['loss_mask'])[0]


METHODS = {
    'pfeiffer': (Bottleneck(dim=4),),
    'lora_ia3': (LoRA(rank=2, alpha=4, targets=('q', 'v', 'down')), IA3()),
    'prompt_prefix': (PromptTuning(num_tokens=3), PrefixTuning(num_tokens=2)),
    'ladder': (LadderSide(reduction=2),),
}


@pytest.mark.parametrize('name, config', [(name, TINY) for name in sorted(METHODS)]
                         + [('pfeiffer', UNTIED)],
                         ids=sorted(METHODS) + ['pfeiffer-untied'])
def test_gathered_loss_and_gradients_equal_full_logits(name, config):
  batch = packed_batch(np.random.RandomState(0))
  counts = (batch['loss_mask'] != 0).sum(1)
  assert counts.sum() < 0.5 * batch['loss_mask'].size
  model, params = Llama(config, peft=METHODS[name]), base(config)
  peft = moved(model, params)
  reference, reference_grads = jax.value_and_grad(full_logits_loss, argnums=1)(
      model, peft, params, batch)
  for budget in (int(counts.max()), None):  # exactly the most a row has; every position
    (loss, (weight, overflowed)), grads = jax.jit(jax.value_and_grad(
        functools.partial(batch_loss, model, budget=budget), has_aux=True))(peft, params, batch)
    assert not overflowed
    assert float(weight) == pytest.approx(batch['loss_mask'].sum())
    assert relative_error(loss, reference) < 1e-6
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
      assert relative_error(got, want) < 1e-5


def test_a_batch_over_the_budget_is_computed_whole_and_counted():
  batch = packed_batch(np.random.RandomState(1))
  batch['loss_mask'][1, :] = 1  # one row with every position counted
  model, params = Llama(TINY, peft=(LoRA(rank=2, alpha=4),)), base(TINY)
  peft = moved(model, params)
  reference, reference_grads = jax.value_and_grad(full_logits_loss, argnums=1)(
      model, peft, params, batch)
  (loss, (_, overflowed)), grads = jax.jit(jax.value_and_grad(
      functools.partial(batch_loss, model, budget=12), has_aux=True))(peft, params, batch)
  assert bool(overflowed)
  assert relative_error(loss, reference) < 1e-6
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
    assert relative_error(got, want) < 1e-5
  # the gathered branch alone would have dropped positions: the fallback is what made it exact
  hidden = model.apply({'params': params, 'peft': peft}, batch['tokens'],
                       positions=batch['positions'], segment_ids=batch['segment_ids'],
                       return_hidden=True)
  kept = np.where(np.cumsum(batch['loss_mask'] != 0, axis=1) <= 12, batch['loss_mask'], 0)
  truncated = masked_token_loss(TINY, params, hidden, batch['targets'], kept, None)[0]
  assert relative_error(truncated, reference) > 1e-2


def test_chunks_cover_every_position():
  """More positions than one chunk holds, not a multiple of it."""
  config = dataclasses.replace(TINY, vocab_size=1 << 20)  # chunk_rows -> 16
  assert chunk_rows(config.vocab_size) == 16
  rng = np.random.RandomState(2)
  hidden = jnp.asarray(rng.randn(2, 37, TINY.hidden_size), jnp.float32)
  params = {'embed_tokens': {'embedding': jnp.asarray(rng.randn(64, TINY.hidden_size), jnp.float32)}}
  small = dataclasses.replace(TINY, vocab_size=64, tie_word_embeddings=True)
  targets = jnp.asarray(rng.randint(0, 64, (2, 37)), jnp.int32)
  mask = jnp.asarray(rng.rand(2, 37) < 0.3, jnp.float32)
  want = token_cross_entropy(lm_head_logits(small, params, hidden), targets, mask)[0]
  with_small_chunks = dataclasses.replace(small, vocab_size=1 << 20)
  # the head reads the table it is given; only the chunking follows vocab_size
  got = masked_token_loss(with_small_chunks, params, hidden, targets, mask, None)[0]
  assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize('config', [TINY, UNTIED], ids=['tied', 'untied'])
def test_logits_at_and_return_hidden(config):
  model = Llama(config, peft=(PromptTuning(num_tokens=2),))
  params = base(config)
  variables = {'params': params, 'peft': moved(model, params)}
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 9)), jnp.int32)
  logits = model.apply(variables, tokens)
  at = jnp.asarray([[0, 8, 3], [5, 5, 1]], jnp.int32)
  np.testing.assert_array_equal(model.apply(variables, tokens, logits_at=at),
                                jnp.take_along_axis(logits, at[..., None], axis=1))
  hidden = model.apply(variables, tokens, return_hidden=True)
  assert hidden.shape == (2, 9, config.hidden_size)
  np.testing.assert_allclose(lm_head_logits(config, params, hidden), logits, rtol=0, atol=1e-6)


class _Batches:
  """A grain-like iterator of loss masks whose state is its position."""

  def __init__(self, masks):
    self.masks, self.position = masks, 0

  def __next__(self):
    self.position += 1
    if self.position > len(self.masks):
      raise StopIteration
    return {'loss_mask': self.masks[self.position - 1]}

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']


def test_the_budget_comes_from_the_data_and_leaves_the_iterator_where_it_was():
  masks = [np.zeros((4, 128), np.float32) for _ in range(20)]
  masks[3][2, :21] = 1    # the most any row has in the sampled batches: 21 -> 21·1.25 -> 32
  masks[18][0, :100] = 1  # past the sample: not seen
  iterator = _Batches(masks)
  next(iterator)
  assert derive_budget('auto', iterator, 128) == 32
  assert iterator.position == 1
  assert derive_budget('all', iterator, 128) is None
  assert derive_budget('24', iterator, 128) == 24
  masks[5][1, :90] = 1  # most rows' worth: gathering would save too little
  assert derive_budget('auto', _Batches(masks), 128) is None
  with pytest.raises(ValueError, match='config.loss_positions'):
    derive_budget('some', iterator, 128)


def test_step_flops_by_hand():
  c = TINY
  body = c.num_layers * (2 * c.hidden_size * 48 + 2 * c.hidden_size * 16 + 3 * c.hidden_size * 80)
  assert flops.body_matrix_params(c) == body
  rows, seq, positions = 2, 10, 7
  attention = 4 * c.num_layers * 6 * 8 * (10 * 11 / 2)
  head = 4 * c.hidden_size * c.vocab_size * positions
  ia3 = flops.train_step_flops(c, (IA3(),), rows=rows, seq_len=seq, logit_positions=positions)
  assert ia3 == pytest.approx(rows * (4 * body * seq + 3 * attention) + head)
  lora = LoRA(rank=2, alpha=4)
  with_lora = flops.train_step_flops(c, (lora,), rows=rows, seq_len=seq, logit_positions=positions)
  assert with_lora - ia3 == pytest.approx(6 * lora.num_params(c) * rows * seq)
  ladder = LadderSide(reduction=2)  # no backward through the backbone
  assert flops.train_step_flops(c, (ladder,), rows=rows, seq_len=seq, logit_positions=positions) \
      == pytest.approx(rows * (2 * body * seq + attention + 6 * ladder.num_params(c) * seq) + head)
  prefix = flops.train_step_flops(c, (PrefixTuning(num_tokens=3),), rows=rows, seq_len=seq,
                                  logit_positions=positions)
  assert prefix - ia3 == pytest.approx(rows * 3 * 4 * c.num_layers * 48 * 10 * 3)
  assert flops.logit_positions(8, 128, 32, 2, overflowed=1) == 8 * 32 + 4 * 96
  assert flops.logit_positions(8, 128, None, 1, overflowed=0) == 8 * 128


def test_peaks():
  assert flops.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert flops.peak_flops('TPU v5 lite', 'float32') == 197e12
  assert flops.peak_flops('TPU v5p', 'bfloat16') == 459e12
  assert flops.peak_flops('cpu', 'float32') is None
  assert flops.peak_flops('cpu', 'float32', override_tflops=2.0) == 2e12


@pytest.mark.parametrize('key, value, message', [
    ('loss_positions', 'most', "config.loss_positions must be 'auto', 'all' or a positive"),
    ('loss_positions', '0', "config.loss_positions must be"),
    ('peak_tflops', -1.0, 'config.peak_tflops must be ≥ 0'),
    ('attention', 'flash', 'config.attention must be one of auto, xla, cudnn, splash, pallas'),
    ('attention', 'splash', "config.attention='splash' runs on a tpu; this run's backend is cpu"),
    ('attention', 'cudnn', "config.attention='cudnn' runs on a gpu"),
])
def test_bad_speed_settings_are_named_before_anything_runs(key, value, message):
  from additive_jax.train.config import default_config
  from additive_jax.train.config_checks import check_config
  config = default_config()
  config[key] = value
  with pytest.raises(ValueError, match=message):
    check_config(config)
