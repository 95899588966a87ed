"""`config.start_from`: a run that starts from trained adapters (a run folder or an adapter
file, one or a weighted average), and `num_steps=0`, which scores them on the run's task and
keeps them as the run's checkpoint and adapter."""

import jax
import ml_collections
import numpy as np
import pytest

from additive_jax.model.load import load_config
from additive_jax.peft import IA3, LoRA, load_adapter
from additive_jax.train.loop import train_and_evaluate
from additive_jax.train.restore import restore_run
from additive_jax.train.start_from import load_start
from cli_helpers import in_process_config

TEST_ROWS = 40


def run_config(model, data_dir, seed=0, steps=3, methods=(IA3(),)):
  config = in_process_config(model, data_dir, list(methods))
  config.seq_len, config.num_steps, config.seed = 32, steps, seed
  config.eval_every = config.checkpoint_every = max(steps, 1)
  for entry in config.peft.values():
    entry.optimizer.learning_rate = 0.3  # large: the two runs' scales differ visibly
  config.test_metric, config.test_split, config.test_limit = 'accuracy', 'test', TEST_ROWS
  config.test_before = False
  return config


def scoring_config(model, data_dir, *sources, weights=()):
  """A run that trains nothing and takes its methods from the adapters (configs/average.py)."""
  config = run_config(model, data_dir, steps=0)
  config.peft = ml_collections.ConfigDict()
  config.start_from, config.start_weights = tuple(map(str, sources)), weights
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """Two IA3 runs of different seeds: (workdir, summary) each."""
  runs = []
  for seed in (0, 1):
    workdir = tmp_path_factory.mktemp(f'seed{seed}')
    config = run_config(tiny_with_tokenizer, small_sst2, seed=seed)
    runs.append((workdir, train_and_evaluate(config, str(workdir))))
  return runs


def leaves(workdir):
  return jax.device_get(restore_run(str(workdir), 'latest').peft)


def test_one_run_scored_again_gives_its_accuracy_and_its_leaves(
    trained, tmp_path, tiny_with_tokenizer, small_sst2):
  (source, summary), _ = trained
  config = scoring_config(tiny_with_tokenizer, small_sst2, source)
  scored = train_and_evaluate(config, str(tmp_path))
  assert scored['accuracy_after'] == summary['accuracy_after']
  assert scored['test_step'] == 0 and 'tokens_per_s' not in scored
  assert scored['eval_loss'] > 0  # its checkpoint is ranked by it, as every checkpoint is
  jax.tree.map(np.testing.assert_array_equal, leaves(tmp_path), leaves(source))
  run = restore_run(str(tmp_path), 'latest')  # the run names what it holds: IA3, from the adapters
  assert run.methods == (IA3(),) and run.step == 0
  methods, _ = load_adapter(str(tmp_path / 'adapter'), load_config(tiny_with_tokenizer))
  assert methods == (IA3(),)


def test_a_weighted_average_of_two_runs_is_their_leaves_weighted(
    trained, tmp_path, tiny_with_tokenizer, small_sst2):
  (a, _), (b, _) = trained
  config = scoring_config(tiny_with_tokenizer, small_sst2, a / 'adapter', b, weights=(0.25, 0.75))
  train_and_evaluate(config, str(tmp_path))
  expected = jax.tree.map(lambda x, y: 0.25 * x + 0.75 * y, leaves(a), leaves(b))
  assert not np.allclose(jax.tree.leaves(leaves(a))[0], jax.tree.leaves(leaves(b))[0])
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
               leaves(tmp_path), expected)


def test_training_goes_on_from_an_adapter(trained, tmp_path, tiny_with_tokenizer, small_sst2):
  (source, summary), _ = trained
  config = run_config(tiny_with_tokenizer, small_sst2, steps=2)
  config.start_from, config.test_before = (str(source),), True
  resumed = train_and_evaluate(config, str(tmp_path))
  assert resumed['accuracy_before'] == summary['accuracy_after']


@pytest.mark.parametrize('change, message', [
    ({'start_weights': (1.0,)}, r'config.start_weights has 1 weights for 2 adapters'),
    ({'start_weights': (1.0, 'a')}, r'config.start_weights must be numbers'),
    ({'start_from': (), 'start_weights': ()},
     r'config.num_steps=0 trains nothing; it scores the adapters of config.start_from'),
    ({'start_from': ('/nonexistent/adapter',)},
     r'config.start_from: no adapter file or run folder /nonexistent/adapter'),
])
def test_bad_start_keys_are_named(trained, tiny_with_tokenizer, small_sst2, change, message):
  (a, _), (b, _) = trained
  config = scoring_config(tiny_with_tokenizer, small_sst2, a, b)
  for key, value in change.items():
    config[key] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    load_start(config)


def test_other_methods_are_refused(trained, tiny_with_tokenizer, small_sst2):
  (a, _), _ = trained
  config = run_config(tiny_with_tokenizer, small_sst2, methods=(LoRA(rank=2),))
  config.start_from = (str(a),)
  with pytest.raises(ValueError, match=r'config.start_from holds IA3\(\), config.peft names '
                                       r'LoRA\(rank=2\)'):
    load_start(config)
