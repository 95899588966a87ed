"""A non-finite loss stops the run, naming the step and the last good checkpoint, which stays
restorable; or, with config.nonfinite='skip', that step's update is not applied and counted.
The loop reads the flag only where it logs, evaluates or saves: between those, no
device-to-host transfer happens."""

import jax
import numpy as np
import pytest

from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.train import loop
from additive_jax.train.log_window import LogWindow
from additive_jax.train.loop import NonFiniteError, train_and_evaluate
from additive_jax.train.restore import restore_run
from cli_helpers import in_process_config

POISONED_STEP = 3  # the third batch's loss mask holds a NaN


@pytest.fixture
def poisoned_data(monkeypatch):
  make = loop.make_train_iterator

  def make_poisoned(*args, **kwargs):
    iterator, report = make(*args, **kwargs)
    return _Poisoned(iterator), report

  monkeypatch.setattr(loop, 'make_train_iterator', make_poisoned)


class _Poisoned:
  """The run's iterator, whose POISONED_STEP-th batch (after the budget's look-ahead, which the
  iterator's state puts back) has a NaN loss weight."""

  def __init__(self, iterator):
    self.iterator, self.served = iterator, 0

  def __next__(self):
    batch = dict(next(self.iterator))
    self.served += 1
    if self.served == POISONED_STEP:
      batch['loss_mask'] = np.where(batch['loss_mask'] > 0, np.nan, 0).astype(np.float32)
    return batch

  def get_state(self):
    return {'inner': self.iterator.get_state(), 'served': self.served}

  def set_state(self, state):
    self.iterator.set_state(state['inner'])
    self.served = state['served']

  def close(self):
    self.iterator.close()


def config_for(tiny_with_tokenizer, small_sst2, nonfinite):
  config = in_process_config(tiny_with_tokenizer, small_sst2, [Bottleneck(dim=4)])
  config.seq_len, config.num_steps, config.checkpoint_every, config.log_every = 32, 4, 1, 1
  config.eval_every, config.nonfinite, config.keep_checkpoints = 0, nonfinite, 4
  return config


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_with_tokenizer, small_sst2, tmp_path, poisoned_data):
  config = config_for(tiny_with_tokenizer, small_sst2, 'stop')
  with pytest.raises(NonFiniteError, match=r'step 3: the loss is nan .* The last good checkpoint '
                                           r'is step 2 in .*checkpoints, kept'):
    train_and_evaluate(config, str(tmp_path))
  run = restore_run(str(tmp_path), 'latest')
  assert run.step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(run.peft))


def test_skip_leaves_that_steps_update_out_and_counts_it(tiny_with_tokenizer, small_sst2, tmp_path,
                                                        poisoned_data):
  config = config_for(tiny_with_tokenizer, small_sst2, 'skip')
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary['nonfinite_skipped'] == 1 and np.isfinite(summary['final_loss'])
  before, at, after = (restore_run(str(tmp_path), step).peft for step in (2, 3, 4))
  for x, y, z in zip(jax.tree.leaves(before), jax.tree.leaves(at), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)  # the poisoned step applied nothing
    assert np.isfinite(z).all()
  assert not all(np.array_equal(y, z) for y, z in zip(jax.tree.leaves(at), jax.tree.leaves(after)))


def test_a_nonfinite_step_between_logs_is_named_at_the_next_checkpoint_step(
    tiny_with_tokenizer, small_sst2, tmp_path, poisoned_data):
  config = config_for(tiny_with_tokenizer, small_sst2, 'stop')
  config.num_steps, config.log_every, config.checkpoint_every = 6, 6, 2
  with pytest.raises(NonFiniteError, match=r'step 3: the loss is nan .* The last good checkpoint '
                                           r'is step 2 in .*checkpoints, kept'):
    train_and_evaluate(config, str(tmp_path))
  assert restore_run(str(tmp_path), 'latest').step == 2  # step 4 was not saved


@pytest.fixture
def guarded_reads(monkeypatch):
  """Reads of a device array made while jax.transfer_guard_device_to_host is 'disallow'. On a
  CPU the guard itself never fires (a CPU array is host memory already), so each read is
  caught where jax makes them all, `ArrayImpl._value`, under the guard's own setting."""
  from jax._src import array, config as jax_config  # pylint: disable=import-outside-toplevel
  reads, value = [], array.ArrayImpl._value

  def watched(self):
    if jax_config.transfer_guard_device_to_host.value == 'disallow':
      reads.append(self.shape)
    return value.fget(self)

  monkeypatch.setattr(array.ArrayImpl, '_value', property(watched))
  return reads


def test_between_settlings_the_host_reads_nothing_from_the_device(
    tiny_with_tokenizer, small_sst2, tmp_path, guarded_reads):
  config = config_for(tiny_with_tokenizer, small_sst2, 'stop')
  config.num_steps, config.log_every, config.checkpoint_every = 4, 4, 4
  summary = train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary['final_loss'])
  assert guarded_reads == []


def test_a_read_between_settlings_is_caught(tiny_with_tokenizer, small_sst2, tmp_path,
                                           monkeypatch, guarded_reads):
  """What the test above would see of a loop that read every step's non-finite flag."""
  add = LogWindow.add

  def add_and_read(self, step, metrics, batch):
    add(self, step, metrics, batch)
    return bool(metrics['nonfinite'])

  monkeypatch.setattr(LogWindow, 'add', add_and_read)
  config = config_for(tiny_with_tokenizer, small_sst2, 'stop')
  config.num_steps, config.log_every, config.checkpoint_every = 2, 2, 2
  train_and_evaluate(config, str(tmp_path))
  assert guarded_reads == [(), ()]
