"""The end of a run: `config.test_checkpoint='best'` tests the checkpoint the eval metric ranks
best (on its fixed dev subset), not the last, and `test_before=False` skips the score before; `test_hits.json` holds that test's per-row
outcomes; `adapter/` holds the trainables tested, which reload to the same accuracy; the
summary has the step's compiled memory, tokens/s and the adapter's bytes."""

import json
import os

import jax
import numpy as np
import pytest

from additive_jax.eval.metrics import score
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_model
from additive_jax.peft import IA3, load_adapter
from additive_jax.train.config_checks import check_config
from additive_jax.train.loop import train_and_evaluate
from additive_jax.train.restore import restore_run
from cli_helpers import in_process_config


def best_run_config(model, data_dir):
  config = in_process_config(model, data_dir, [IA3()])
  config.seq_len, config.num_steps = 32, 6
  config.eval_every = config.checkpoint_every = 2
  config.keep_checkpoints, config.keep_best = 1, 1
  config.peft.ia3.optimizer.learning_rate = 0.3  # large: the dev accuracy moves between evals
  config.eval_metric, config.eval_metric_limit = 'accuracy', 24
  config.test_metric, config.test_split, config.test_limit = 'accuracy', 'test', 40
  config.test_checkpoint, config.test_before = 'best', False
  return config


@pytest.fixture(scope='module')
def best_run(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  workdir = tmp_path_factory.mktemp('best')
  config = best_run_config(tiny_with_tokenizer, small_sst2)
  return workdir, config, train_and_evaluate(config, str(workdir))


def test_the_best_checkpoint_by_dev_accuracy_is_tested(best_run):
  workdir, _, summary = best_run
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  dev = {line['step']: line['eval_accuracy'] for line in lines if 'eval_accuracy' in line}
  assert sorted(dev) == [2, 4, 6]
  best = max(sorted(dev), key=dev.__getitem__)
  assert summary['test_step'] == best
  assert summary['eval_accuracy'] == dev[6]  # the summary's eval figures stay the last eval's


def test_the_hits_are_the_tested_accuracy_row_by_row(best_run):
  workdir, _, summary = best_run
  hits = json.loads((workdir / 'test_hits.json').read_text())
  assert (hits['metric'], hits['split'], hits['limit'], hits['step']) == (
      'accuracy', 'test', 40, summary['test_step'])
  assert len(hits['hits']) == 40 and set(hits['hits']) <= {0, 1}
  assert np.mean(hits['hits']) == summary['accuracy_after']


def test_the_adapter_written_is_the_tested_checkpoint(best_run, tiny_with_tokenizer):
  workdir, config, summary = best_run
  model_config, params = load_model(tiny_with_tokenizer)
  methods, peft = load_adapter(str(workdir / 'adapter'), model_config)
  saved = restore_run(str(workdir), summary['test_step'])
  jax.tree.map(np.testing.assert_array_equal, peft, jax.device_get(saved.peft))
  rescored = score('accuracy', Llama(model_config, peft=methods), {'params': params, 'peft': peft},
                   saved_tokenizer(tiny_with_tokenizer), config.data, 'test', 40)
  assert rescored['accuracy'] == summary['accuracy_after']
  assert summary['adapter_bytes'] == sum(
      os.path.getsize(workdir / 'adapter' / name) for name in os.listdir(workdir / 'adapter')
      if name != 'COMPLETE.json')


def saved_tokenizer(model):
  from additive_jax.model.tokenizer import load_tokenizer
  return load_tokenizer(model)


def test_the_summary_has_memory_and_speed(best_run):
  summary = best_run[2]
  assert summary['step_memory_bytes'] > 0 and summary['tokens_per_s'] > 0


def test_test_before_false_scores_after_training_only(best_run):
  workdir, _, summary = best_run
  assert 'accuracy_before' not in summary and 'accuracy_after' in summary
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'accuracy' in line] == [6]


def test_best_needs_a_kept_best_checkpoint(tiny_with_tokenizer, small_sst2):
  config = best_run_config(tiny_with_tokenizer, small_sst2)
  config.keep_best = 0
  with pytest.raises(ValueError, match=r"test_checkpoint='best' needs config.keep_best >= 1"):
    check_config(config)
  config.keep_best, config.test_checkpoint = 1, 'final'
  with pytest.raises(ValueError, match=r"config.test_checkpoint must be 'last' or 'best', got "
                                       r"'final'"):
    check_config(config)
