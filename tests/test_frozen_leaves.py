"""Frozen leaves: a method may hold leaves it loads and never trains (`Method.frozen_keys`).

The optimizer gives them no state and no update (weight decay included), the train step
builds no gradient for them, counts report them apart, and a run that loads them from an
adapter file or another run's folder restores from its own workdir alone.

The method here (defined in this file, as a user would): a frozen Pfeiffer adapter read from a
file, scaled by a trained scalar per layer, x = r + f + g_l · A(r + f) (g_l = 1 at init).
Parameters: L trainable; the adapter's frozen.
"""

import dataclasses
import functools
import json
import shutil
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.peft.frozen import load_frozen
from additive_jax.peft.param_count import count_methods, format_table
from additive_jax.peft.registry import parse_method
from additive_jax.train.config import default_config, entries_of
from additive_jax.train.optimizer import FROZEN, make_optimizer, method_settings
from additive_jax.train.restore import restore_run
from additive_jax.train.step import TrainState, batch_loss, train_step
from adapter_files_helpers import random_peft
from conftest import TINY, relative_error
from test_train_step import make_batch

ADAPTER = aj.peft.Bottleneck(dim=4)


@dataclasses.dataclass(frozen=True)
class ScaledAdapter(aj.peft.Method):
  source: str = ''
  adapter: str = ''  # the frozen adapter's constructor call

  key: ClassVar[str] = 'scaled_adapter'
  frozen_keys: ClassVar[tuple[str, ...]] = ('adapter',)
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 0.1, 'weight_decay': 0.5}

  def num_params(self, config) -> int:
    return config.num_layers

  def num_frozen_params(self, config) -> int:
    return parse_method(self.adapter).num_params(config)

  def frozen_sources(self):
    return (self.source,)

  def with_frozen(self, paths, methods):
    return dataclasses.replace(self, source=paths[0], adapter=methods[0].call_string())

  def shape_alike(self):
    return dataclasses.replace(self, source='')

  def init_leaves(self, rng, config, params, tokenizer=None):
    if self.source:
      _, adapter = load_frozen(self.source, config)
    else:  # shapes only (counting, restore)
      adapter = parse_method(self.adapter).init_leaves(rng, config, params)
    return {'adapter': adapter, 'scale': jnp.ones((config.num_layers,), jnp.float32)}

  def mlp_delta(self, p, r, f):
    return p['scale'].astype(f.dtype) * parse_method(self.adapter).mlp_delta(p['adapter'], r, f)


@pytest.fixture(scope='module')
def source(tmp_path_factory, tiny_hf_llama):
  """An adapter file of random (non-zero) Pfeiffer values, and its method."""
  directory = tmp_path_factory.mktemp('source')
  aj.peft.save_adapter(str(directory), (ADAPTER,), random_peft((ADAPTER,), TINY), TINY)
  return str(directory), ScaledAdapter(str(directory), ADAPTER.call_string())


def test_optimizer_gives_frozen_leaves_no_state_and_no_update(tiny_hf_llama, source):
  _, _, params = tiny_hf_llama
  method = source[1]
  model = Llama(TINY, peft=(method,))
  peft = model.init_peft(jax.random.key(0), params)['peft']
  settings = {method.key: method_settings(ScaledAdapter, {'schedule': 'constant'})}
  optimizer = make_optimizer([method.key], settings, 3, frozen_keys={method.key: ('adapter',)})
  state = TrainState.create(peft, optimizer)
  step = jax.jit(functools.partial(train_step, model, optimizer, 1))
  for _ in range(3):
    state, _ = step(state, params, make_batch(np.random.RandomState(0), 2, 12, TINY.vocab_size))
  jax.tree.map(np.testing.assert_array_equal, state.peft['scaled_adapter']['adapter'],
               peft['scaled_adapter']['adapter'])  # weight decay 0.5 at lr 0.1: bit for bit
  assert np.abs(state.peft['scaled_adapter']['scale'] - 1).min() > 1e-3  # the scale trained
  # Adam's moments exist for the scale alone: [L] arrays, none of the adapter's shapes
  shapes = {leaf.shape for leaf in jax.tree.leaves(state.opt_state)}
  assert shapes <= {(), (TINY.num_layers,)}, shapes
  # without frozen_keys the same tree would be decayed and given state
  loose = make_optimizer([method.key], settings, 3)
  assert (TINY.num_layers, 48, 4) in {leaf.shape for leaf in jax.tree.leaves(loose.init(peft))}
  assert FROZEN.startswith('(')  # the label is no method key


def test_no_gradient_reaches_a_frozen_leaf(tiny_hf_llama, source):
  _, _, params = tiny_hf_llama
  model = Llama(TINY, peft=(source[1],))
  peft = model.init_peft(jax.random.key(0), params)['peft']
  batch = make_batch(np.random.RandomState(0), 2, 12, TINY.vocab_size)
  grads = jax.grad(lambda peft: batch_loss(model, peft, params, batch)[0])(peft)['scaled_adapter']
  assert all(not np.any(g) for g in jax.tree.leaves(grads['adapter']))
  assert np.all(grads['scale'] != 0)
  # the detector can fail: applied directly, the model differentiates through the adapter
  raw = jax.grad(lambda peft: jnp.sum(model.apply({'params': params, 'peft': peft},
                                                   batch['tokens'])))(peft)['scaled_adapter']
  assert any(np.any(g) for g in jax.tree.leaves(raw['adapter']))


def test_counts_keep_frozen_leaves_apart(source):
  (count,) = count_methods((source[1],), TINY)
  assert (count.formula, count.leaves) == (TINY.num_layers,) * 2
  assert count.frozen_formula == count.frozen == ADAPTER.num_params(TINY) == 3 * (2 * 48 * 4 + 52)
  table = format_table([count], TINY.num_base_params)
  assert table.splitlines()[0].split()[-1] == 'frozen' and f'{count.frozen:,}' in table
  plain = format_table(count_methods((ADAPTER,), TINY), TINY.num_base_params)
  assert 'frozen' not in plain


@pytest.fixture(scope='module')
def source_run(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """A finished 2-step Pfeiffer run: a run folder to load frozen."""
  config = tiny_run_config(tiny_with_tokenizer, small_sst2,
                           entries_of([aj.peft.Bottleneck(dim=4)]))
  workdir = tmp_path_factory.mktemp('source_run')
  aj.train_and_evaluate(config, str(workdir))
  return str(workdir)


def tiny_run_config(model, data_dir, peft):
  config = default_config()
  config.model, config.data.data_dir, config.peft = model, data_dir, peft
  config.batch_size, config.seq_len, config.num_steps = 8, 32, 2
  config.log_every, config.eval_every, config.eval_batches, config.checkpoint_every = 1, 2, 1, 2
  config.lock()
  return config


def test_a_run_folder_source_restores_from_the_workdir_alone(tmp_path, tiny_with_tokenizer,
                                                             small_sst2, source_run):
  config = tiny_run_config(tiny_with_tokenizer, small_sst2,
                           entries_of([ScaledAdapter(source=source_run)]))
  workdir = tmp_path / 'run'
  summary = aj.train_and_evaluate(config, str(workdir))
  base, params = aj.load_model(tiny_with_tokenizer)
  frozen = aj.peft.Bottleneck(dim=4).num_params(base)
  assert (summary['trainable_params'], summary['frozen_params']) == (base.num_layers, frozen)
  assert config.peft.scaled_adapter.adapter == 'Bottleneck(dim=4)'  # the source's method, filled
  copy = workdir / 'frozen' / 'scaled_adapter' / '0'
  assert json.loads((copy / 'source.json').read_text()) == {'source': source_run}
  expected = restore_run(source_run).peft['bottleneck']
  moved = tmp_path / 'moved'
  shutil.move(str(workdir), str(moved))
  shutil.rmtree(source_run)  # the source is gone; the moved workdir is all there is
  run = restore_run(str(moved))
  assert run.methods == (ScaledAdapter(source=source_run, adapter='Bottleneck(dim=4)'),)
  jax.tree.map(np.testing.assert_array_equal, run.peft['scaled_adapter']['adapter'], expected)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, base.vocab_size, (1, 6)))
  logits = Llama(base, peft=run.methods).apply({'params': params, 'peft': run.peft}, tokens)
  assert relative_error(logits, Llama(base).apply({'params': params}, tokens)) > 1e-4
