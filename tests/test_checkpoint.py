"""Orbax checkpoints of the trainable state (`Checkpoints`), on disk: latest-N and best-N kept
together, asynchronous saves, restore onto another mesh, and clear errors for a checkpoint of
another base or method set and for a corrupt or truncated file.

A killed save and a checkpoint's size on disk are tested on real runs in
test_checkpoint_resume.py."""

import glob
import os
import re
import shutil
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from additive_jax.train.restore import abstract_train_state
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.lora import LoRA
from additive_jax.train.checkpoint import CheckpointError, Checkpoints
from additive_jax.train.config import default_config, entries_of
from additive_jax.train.mesh import make_mesh, replicated
from conftest import TINY

BASE = TINY.replace(num_layers=2)  # the shapes asserted below are [L = 2, D, dim], e.g. (2, 48, 8)
METHODS = (Bottleneck(dim=8), LoRA(rank=2, alpha=4, targets=('q', 'v')))


def run_config(methods=METHODS) -> dict:
  """What a run saves as its 'config' item."""
  config = default_config()
  config.model = '/models/tiny'
  config.peft = entries_of(methods)
  return config.to_dict()


def abstract_state(sharding_of, methods=METHODS, base=BASE):
  """The TrainState's shapes with `sharding_of(leaf)` as each leaf's sharding."""
  abstract = abstract_train_state(run_config(methods), methods, base)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)),
                      abstract)


def random_state(abstract, seed=0):
  """Arrays for `abstract`, on its shardings; floats random (none at its init value)."""
  rng = np.random.RandomState(seed)

  def fill(x):
    value = (rng.randn(*x.shape) if np.issubdtype(x.dtype, np.floating) else
             rng.randint(0, 100, x.shape))
    return jax.device_put(np.asarray(value, x.dtype), x.sharding)
  return jax.tree.map(fill, abstract)


def iterator():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


def assert_same_values(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


@pytest.fixture(scope='module')
def eight_devices():
  return make_mesh((8, 1, 1))


@pytest.fixture(scope='module')
def one_device():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def saved(tmp_path_factory, eight_devices):
  """(directory, the state) of one checkpoint, step 1, saved from 8 devices."""
  directory = str(tmp_path_factory.mktemp('saved') / 'checkpoints')
  state = random_state(abstract_state(lambda _: replicated(eight_devices)))
  checkpoints = Checkpoints(directory)
  checkpoints.save(1, state, iterator(), run_config())
  checkpoints.close()  # waits for the async save
  return directory, state


@pytest.mark.parametrize('keep_best, kept', [(1, [2, 5, 6]), (0, [5, 6])])
def test_the_latest_and_the_best_are_kept_together(tmp_path, one_device, keep_best, kept):
  state = random_state(abstract_state(lambda _: replicated(one_device), methods=(IA3(),)))
  checkpoints = Checkpoints(str(tmp_path), keep=2, keep_best=keep_best)
  eval_loss = {2: 1.0, 4: 3.0, 6: 2.0}  # evaluated every other step; step 2 is the best
  for step in range(1, 7):
    metrics = {'eval_loss': eval_loss[step]} if step in eval_loss else {'loss': 9.0}
    checkpoints.save(step, state, iterator(), run_config(), metrics=metrics)
  checkpoints.close()
  assert sorted(int(name) for name in os.listdir(tmp_path)) == kept


def test_the_best_survives_a_resume(tmp_path, one_device):
  """A run stopped after its best evaluation and resumed (a new manager on the folder) still
  knows which checkpoint is best: the ranking is on disk, not in the stopped process."""
  state = random_state(abstract_state(lambda _: replicated(one_device), methods=(IA3(),)))
  checkpoints = Checkpoints(str(tmp_path), keep=1, keep_best=1, best_metric='eval_accuracy',
                            best_mode='max')
  for step, accuracy in ((2, 0.7), (4, 0.9)):
    checkpoints.save(step, state, iterator(), run_config(), metrics={'eval_accuracy': accuracy})
  checkpoints.close()
  resumed = Checkpoints(str(tmp_path), keep=1, keep_best=1, best_metric='eval_accuracy',
                        best_mode='max')
  for step, accuracy in ((6, 0.8), (8, 0.6)):
    resumed.save(step, state, iterator(), run_config(), metrics={'eval_accuracy': accuracy})
  resumed.wait()
  assert resumed.best_step() == 4
  resumed.close()
  assert sorted(int(name) for name in os.listdir(tmp_path)) == [4, 8]


def test_a_save_runs_in_the_background(tmp_path, one_device, monkeypatch):
  """save() returns while the save goes on in another thread, the step in its temporary folder
  until the save is complete. The save is held at the state's finalize step (the arrays written,
  the folder not yet renamed) until the test has looked."""
  finalize, released = ocp.StandardCheckpointHandler.finalize, threading.Event()

  def held_finalize(self, directory):
    released.wait(timeout=60)  # bounded: a save() that waits for its own end fails, not hangs
    finalize(self, directory)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'finalize', held_finalize)
  state = random_state(abstract_state(lambda _: replicated(one_device)))
  checkpoints = Checkpoints(str(tmp_path))
  try:
    checkpoints.save(3, state, iterator(), run_config())
    assert checkpoints.manager.is_saving_in_progress()
    assert os.listdir(tmp_path) == ['3.orbax-checkpoint-tmp']
  finally:
    released.set()
  checkpoints.wait()
  assert os.listdir(tmp_path) == ['3'] and checkpoints.latest_step() == 3
  checkpoints.close()


def test_eight_devices_restore_onto_one_and_one_onto_eight_sharded(saved, tmp_path, eight_devices,
                                                                   one_device):
  directory, state = saved
  on_one = abstract_state(lambda _: replicated(one_device))
  restored = Checkpoints(directory, read_only=True).restore(1, on_one)
  assert_same_values(restored, state)
  assert all(leaf.sharding == target.sharding and leaf.devices() == {jax.devices()[0]}
             for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(on_one)))

  checkpoints = Checkpoints(str(tmp_path))
  checkpoints.save(2, restored, iterator(), run_config())
  checkpoints.wait()
  # Back onto 8 devices, the [L, D, R] matrices split over them on D (48 / 8 rows each): the
  # restore follows the target's shardings, not those it was saved with.
  split = lambda x: NamedSharding(eight_devices, P(None, 'data') if x.shape[1:2] == (48,) else P())
  on_eight = abstract_state(split)
  restored = checkpoints.restore(2, on_eight)
  checkpoints.close()
  assert_same_values(restored, state)
  down = restored.peft['bottleneck']['mlp']['down']
  assert down.sharding == split(down) and len(down.devices()) == 8
  assert {shard.data.shape for shard in down.addressable_shards} == {(2, 6, 8)}


@pytest.mark.parametrize('methods, base, problem', [
    ((Bottleneck(dim=4), METHODS[1]), BASE,
     r"tensor 'peft.bottleneck.mlp.down' has shape \(2, 48, 8\), this model needs \(2, 48, 4\)"),
    ((IA3(),), BASE, r"3 tensors missing \('peft.ia3.l_ff', 'peft.ia3.l_k', 'peft.ia3.l_v'\); "
                     r"8 unexpected tensors \('peft.bottleneck.mlp.down', "),
    (METHODS, BASE.replace(hidden_size=64, head_dim=8, num_heads=8),
     r"tensor 'peft.bottleneck.mlp.down' has shape \(2, 48, 8\), this model needs \(2, 64, 8\)"),
], ids=['another-dim', 'another-method', 'another-base'])
def test_a_checkpoint_of_another_run_is_refused_naming_the_leaves(saved, one_device, methods, base,
                                                                  problem):
  directory, _ = saved
  checkpoints = Checkpoints(directory, read_only=True)
  fits = f'{re.escape(directory)}/1 does not fit this run: {problem}'
  with pytest.raises(CheckpointError, match=fits) as error:
    checkpoints.restore(1, abstract_state(lambda _: replicated(one_device), methods, base))
  assert ("(it was written by a run with model='/models/tiny', peft=['Bottleneck(dim=8)', "
          in str(error.value))


@pytest.mark.parametrize('damaged, how', [
    ('state/_METADATA', 'truncate'), ('state/d/*', 'garbage'),
    ('data/metadata', 'truncate'), ('config/metadata', 'truncate')])
def test_a_corrupt_or_truncated_file_is_named(saved, tmp_path, one_device, damaged, how):
  directory, _ = saved
  copy = str(tmp_path / 'checkpoints')
  shutil.copytree(directory, copy)
  [path] = glob.glob(os.path.join(copy, '1', damaged))
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2] if how == 'truncate' else
            np.random.RandomState(0).bytes(len(data)))
  checkpoints = Checkpoints(copy, read_only=True)
  with pytest.raises(CheckpointError, match=f'^{re.escape(path)} is corrupt or truncated'):
    if damaged.startswith('config'):
      checkpoints.restore_config(1)
    else:
      checkpoints.restore(1, abstract_state(lambda _: replicated(one_device)), iterator())


def test_a_missing_step_is_named(saved):
  directory, _ = saved
  with pytest.raises(CheckpointError, match=r'has no checkpoint of step 7 \(it has steps \[1\]\)'):
    Checkpoints(directory, read_only=True).restore_config(7)
