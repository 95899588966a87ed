"""The grain pipeline: epochs and shards cover every example once, the over-long policy,
iterator state through Orbax, and the loss of packed rows equal to the unpacked loss."""

import collections
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from additive_jax.data.config import data_config
from additive_jax.data.packing import pad_fraction
from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
from additive_jax.data.encode import fit
from additive_jax.model.llama import Llama
from additive_jax.train.loss import token_cross_entropy
from conftest import TINY
from data_helpers import examples_of, pair

SST2_TEST_ROWS = 872


def sst2_test_config(**overrides):
  config = data_config()
  config.split = config.eval_split = 'test'
  config.update(overrides)
  return config


def all_examples(tokenizer, config):
  batches, _ = make_eval_batches(config, tokenizer, batch_size=8, seq_len=128)
  return collections.Counter(examples_of(*batches))


def batches_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('packing', [True, False])
def test_one_epoch_yields_every_example_once(smollm2_tokenizer, packing):
  config = sst2_test_config(packing=packing, num_epochs=1)
  iterator, report = make_train_iterator(config, smollm2_tokenizer, batch_size=1,
                                              seq_len=128, seed=0)
  seen = collections.Counter(examples_of(*iterator))
  assert seen == all_examples(smollm2_tokenizer, config)
  assert sum(seen.values()) == SST2_TEST_ROWS == report.kept


def test_the_seed_orders_the_stream_and_each_epoch_is_reshuffled(smollm2_tokenizer):
  def epochs(seed, num_epochs):
    config = sst2_test_config(packing=False, num_epochs=num_epochs)
    iterator, _ = make_train_iterator(config, smollm2_tokenizer, batch_size=SST2_TEST_ROWS,
                                           seq_len=64, seed=seed)
    return [examples_of(batch) for batch in iterator]

  first_epoch, second_epoch = epochs(seed=0, num_epochs=2)
  assert collections.Counter(first_epoch) == collections.Counter(second_epoch)
  assert first_epoch != second_epoch
  assert epochs(seed=1, num_epochs=1) != [first_epoch]


# Steps that take the stream into its second epoch of 872 examples: a packed batch of
# 8 x 256 holds ~66 SST-2 examples, a padded one 8.
@pytest.mark.parametrize('packing, steps', [(True, 15), (False, 112)])
def test_restored_state_gives_the_batches_of_an_uninterrupted_run(smollm2_tokenizer, packing,
                                                                   steps):
  config = sst2_test_config(packing=packing)
  make = lambda: make_train_iterator(config, smollm2_tokenizer, batch_size=8, seq_len=256,
                                          seed=7)[0]
  uninterrupted = make()
  for _ in range(steps):
    next(uninterrupted)
  state = uninterrupted.get_state()
  expected = [next(uninterrupted) for _ in range(5)]
  resumed = make()
  assert not batches_equal(next(resumed), expected[0])
  resumed.set_state(state)
  assert all(batches_equal(next(resumed), batch) for batch in expected)


def test_iterator_state_round_trips_through_orbax(smollm2_tokenizer, tmp_path):
  config = sst2_test_config()
  make = lambda: make_train_iterator(config, smollm2_tokenizer, batch_size=4, seq_len=64,
                                          seed=3)[0]
  iterator = make()
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path,
                                  item_handlers={'data': grain.checkpoint.CheckpointHandler()})
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]
  restored = make()
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert all(batches_equal(next(restored), batch) for batch in expected)
  assert os.path.exists(tmp_path / '3' / 'data' / 'process_0-of-1.json')


def test_eval_shards_have_equal_batch_counts_and_cover_every_example_once(smollm2_tokenizer):
  config = sst2_test_config()
  shards = [make_eval_batches(config, smollm2_tokenizer, batch_size=6, seq_len=128,
                                   process_index=i, process_count=3)[0] for i in range(3)]
  # 872 rows: shards of 291, 291, 290 rows in batches of 2 rows → 146 batches each
  assert [len(shard) for shard in shards] == [146, 146, 146]
  seen = collections.Counter(example for shard in shards for example in examples_of(*shard))
  assert seen == all_examples(smollm2_tokenizer, config)
  last = shards[2][145]
  assert last['segment_ids'][1].sum() == 0 and last['loss_mask'][1].sum() == 0  # an empty row


def test_batch_size_must_split_over_the_processes(smollm2_tokenizer):
  with pytest.raises(ValueError, match='batch_size 6 is not divisible by the 4 processes'):
    make_train_iterator(sst2_test_config(), smollm2_tokenizer, batch_size=6, seq_len=64,
                             seed=0, process_index=0, process_count=4)


def test_fit_truncates_the_prompt_from_the_left_then_the_response():
  assert fit(pair([1, 2, 3], [4, 5]), 5, 'truncate') == pair([1, 2, 3], [4, 5])
  assert fit(pair([1, 2, 3], [4, 5, 6]), 5, 'truncate') == pair([2, 3], [4, 5, 6])
  assert fit(pair([1, 2, 3], [4, 5, 6, 7, 8, 9]), 5, 'truncate') == pair([], [4, 5, 6, 7, 8])
  assert fit(pair([1, 2, 3], [4, 5, 6]), 5, 'drop') is None


def write_sst2(directory, test_rows):
  (directory / 'sst2').mkdir()
  for split, rows in (('train', ['fine \t1']), ('dev', ['fine \t1']), ('test', test_rows)):
    (directory / 'sst2' / f'{split}.tsv').write_text('sentence\tlabel\n' + '\n'.join(rows) + '\n')


def test_over_long_policies(smollm2_tokenizer, tmp_path):
  # 'Review' ':' ' good' '\n' 'Sent' 'iment' ':' ' positive' EOS: 9 ids fill 8 positions.
  # 30 x ' word' (2229) and 40 x ' long' (986) make prompts of 36 and 46 ids.
  write_sst2(tmp_path, ['good \t1', ' '.join(['word'] * 30) + ' \t0', 'fine \t1',
                        ' '.join(['long'] * 40) + ' \t1'])
  run = lambda policy: make_train_iterator(
      sst2_test_config(data_dir=str(tmp_path), packing=False, num_epochs=1, over_long=policy),
      smollm2_tokenizer, batch_size=1, seq_len=8, seed=0, cache_dir=str(tmp_path / 'cache'))

  iterator, report = run('truncate')
  assert (report.kept, report.truncated, report.dropped) == (2, 2, 0)
  rows = {tuple(batch['tokens'][0]): batch for batch in iterator}
  assert len(rows) == 4
  # the prompt loses its left part; the response and its EOS stay, and are still learned
  words = rows[(2229, 2229, 2229, 198, 35658, 2572, 42, 3524)]
  assert words['targets'][0].tolist() == [2229, 2229, 198, 35658, 2572, 42, 3524, 2]
  assert words['loss_mask'][0].tolist() == [0] * 6 + [1, 1]
  assert (986, 986, 986, 198, 35658, 2572, 42, 2731) in rows

  iterator, report = run('drop')
  assert (report.kept, report.truncated, report.dropped) == (2, 0, 2)
  assert sorted(tuple(batch['tokens'][0]) for batch in iterator) == [
      (21465, 42, 1123, 198, 35658, 2572, 42, 2731), (21465, 42, 4979, 198, 35658, 2572, 42, 2731)]

  with pytest.raises(ValueError, match=r'test.tsv:3: example of 38 tokens is longer than '
                                       r'seq_len \+ 1 = 9 \(2 such examples'):
    run('error')


def test_unknown_policy_and_template_are_named(smollm2_tokenizer):
  for key, value, message in (('over_long', 'shorten', "unknown over-long policy 'shorten'"),
                              ('template', 'alpaca', "unknown template 'alpaca'")):
    with pytest.raises(ValueError, match=message):
      make_train_iterator(sst2_test_config(**{key: value}), smollm2_tokenizer, batch_size=1,
                               seq_len=8, seed=0)


def test_pad_fraction():
  assert pad_fraction({'segment_ids': np.array([[1, 1, 2, 0], [1, 0, 0, 0]])}) == 0.5


def tiny_llama():
  """A random TINY Llama over SmolLM2's vocabulary, its weights 3x the init scale so that
  attention, and so a leak across segments, changes the loss by ~2%."""
  model = Llama(TINY.replace(vocab_size=49152))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return model, jax.tree.map(lambda x: 3 * x, variables)


def summed_loss(model):
  """Jitted (Σ mask · token loss, Σ mask) of a batch; compiled once per batch shape."""
  @jax.jit
  def loss(variables, batch):
    logits = model.apply(variables, batch['tokens'], positions=batch['positions'],
                         segment_ids=batch['segment_ids'])
    return token_cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return lambda variables, batch: [float(x) for x in loss(variables, batch)]


def test_packed_loss_equals_the_loss_of_the_examples_unpacked(smollm2_tokenizer):
  model, variables = tiny_llama()
  config = sst2_test_config(packing=True, num_epochs=1)
  packed, _ = make_train_iterator(config, smollm2_tokenizer, batch_size=2, seq_len=128,
                                       seed=5)
  packed_batch = next(packed)
  # first-fit packing takes the stream in order: the first packed batch holds its first m examples
  m = len(examples_of(packed_batch))
  assert packed_batch['segment_ids'].max() > 2  # rows hold several examples
  config.packing = False
  padded, _ = make_train_iterator(config, smollm2_tokenizer, batch_size=m, seq_len=128,
                                       seed=5)
  padded_batch = next(padded)
  assert collections.Counter(examples_of(padded_batch)) == collections.Counter(
      examples_of(packed_batch))
  loss = summed_loss(model)
  packed_sum, packed_tokens = loss(variables, packed_batch)
  padded_sum, padded_tokens = loss(variables, padded_batch)
  assert packed_tokens == padded_tokens == 2 * m  # each SST-2 example learns its label word + EOS
  assert abs(packed_sum / packed_tokens - padded_sum / padded_tokens) <= 1e-5 * abs(
      padded_sum / padded_tokens)
  # the comparison can fail: without segment ids packed examples see each other
  leaked = dict(packed_batch, segment_ids=np.ones_like(packed_batch['segment_ids']))
  leaked_sum, _ = loss(variables, leaked)
  assert abs(leaked_sum - padded_sum) > 1e-3 * abs(padded_sum)
