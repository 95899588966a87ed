"""The run folder (`train.workdir`): `--checkpoint=best` means the checkpoint the trainer kept as
best and tested, in `export`, `evaluate` and `generate` alike, and the trainer closes what it
opened when a step raises.

The best-checkpoint run is a real run on the tiny base whose evaluations report values set
here (its eval loss and dev accuracy at steps 1, 2, 3: the dev accuracy peaks at step 2, the
eval loss is lowest at step 3, the latest): a run whose two rankings disagree by chance could
not be reproduced."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

from additive_jax.export import export_run
from additive_jax.model.load import load_config
from additive_jax.peft import IA3, load_adapter
from additive_jax.train import loop
from additive_jax.train.restore import restore_run
from additive_jax.train.workdir import RunFolder, best_ranking
from cli_helpers import ROOT, in_process_config
from conftest import xla_flags

EVAL_LOSS = {1: 1.0, 2: 0.8, 3: 0.4}      # lowest at 3
DEV_ACCURACY = {1: 0.5, 2: 0.9, 3: 0.6}   # highest at 2


def config_of(model, data_dir):
  config = in_process_config(model, data_dir, [IA3()])
  config.seq_len, config.num_steps = 32, 3
  config.eval_every = config.checkpoint_every = 1
  config.keep_checkpoints, config.keep_best = 3, 1
  config.eval_metric, config.eval_metric_limit = 'accuracy', 8
  config.test_metric, config.test_split, config.test_limit = 'accuracy', 'test', 8
  config.test_checkpoint, config.test_before = 'best', False
  return config


@pytest.fixture(scope='module')
def best_run(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """(workdir, summary) of the run above."""
  workdir = str(tmp_path_factory.mktemp('best'))
  step = {'done': 0}

  class SetLoss:
    report = 'the eval batches'

    def __init__(self, *args):
      pass

    def __call__(self, state):
      step['done'] = int(state.step)
      return {'eval_loss': EVAL_LOSS[step['done']]}

  def set_metric(run, state, config, metric, split, limit, hits=False):
    assert (metric, split) == ('accuracy', 'dev')
    return {'accuracy': DEV_ACCURACY[int(state.step)]}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, 'LossEvaluator', SetLoss)
    patch.setattr(loop, 'task_metric', set_metric)
    summary = loop.train_and_evaluate(config_of(tiny_with_tokenizer, small_sst2), workdir)
  return workdir, summary


def test_best_is_ranked_by_the_eval_metric_with_its_direction():
  assert best_ranking({'eval_metric': 'accuracy'}) == ('eval_accuracy', 'max')
  assert best_ranking({'eval_metric': 'exact_match'}) == ('eval_exact_match', 'max')
  assert best_ranking({'eval_metric': 'perplexity'}) == ('eval_perplexity', 'min')
  assert best_ranking({'eval_metric': ''}) == ('eval_loss', 'min')


def test_the_trainer_tests_the_best_by_dev_accuracy(best_run):
  workdir, summary = best_run
  assert summary['test_step'] == 2
  logged = RunFolder(workdir).logged_lines()
  assert {line['step']: line['eval_loss'] for line in logged if 'eval_loss' in line} == EVAL_LOSS


def test_every_reader_means_the_trainers_best(best_run, tiny_with_tokenizer, tmp_path):
  workdir, _ = best_run
  assert restore_run(workdir, 'best', trainables=False).step == 2
  assert restore_run(workdir, 'latest', trainables=False).step == 3

  out = export_run(workdir, 'aj', 'best')
  assert out == str(RunFolder(workdir).export('aj', 2))
  _, exported = load_adapter(out, load_config(tiny_with_tokenizer))
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '2', 'state'))
  np.testing.assert_array_equal(exported['ia3']['l_ff'], np.asarray(saved['peft']['ia3']['l_ff']))

  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  def command(name, *args):
    return subprocess.run([sys.executable, '-m', f'additive_jax.{name}', f'--workdir={workdir}',
                           '--checkpoint=best', *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  evaluated = command('evaluate', '--limit=4', f'--output={tmp_path / "eval.json"}')
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert json.loads((tmp_path / 'eval.json').read_text())['step'] == 2
  generated = command('generate', '--prompt=Review: fine\nSentiment:', '--max_new_tokens=2')
  assert generated.returncode == 0, generated.stderr[-2000:]
  assert f'{workdir}: step 2 (best)' in generated.stderr.splitlines()


def test_a_step_that_raises_leaves_the_log_on_disk_and_nothing_open(
    tiny_with_tokenizer, small_sst2, tmp_path, monkeypatch):
  config = config_of(tiny_with_tokenizer, small_sst2)
  config.num_steps, config.log_every, config.eval_every, config.checkpoint_every = 4, 1, 0, 2
  config.eval_metric, config.test_metric = '', ''
  real = loop.jit_train_step

  def failing_at_step_3(*args, **kwargs):
    step = real(*args, **kwargs)

    class Compiled:
      def lower(self, *a):
        compiled = step.lower(*a).compile()

        class Runner:
          calls = 0

          def __call__(self, *b):
            Runner.calls += 1
            if Runner.calls == 3:
              raise RuntimeError('a device failed')
            return compiled(*b)

          def __getattr__(self, name):  # the memory plan, read once compiled
            return getattr(compiled, name)
        return type('Lowered', (), {'compile': lambda self: Runner()})()
    return Compiled()

  monkeypatch.setattr(loop, 'jit_train_step', failing_at_step_3)
  before = set(threading.enumerate())
  with pytest.raises(RuntimeError, match='a device failed'):
    loop.train_and_evaluate(config, str(tmp_path))
  # tqdm's monitor is one thread for every bar of the process, started with the first
  started = [t for t in set(threading.enumerate()) - before if t.name != 'tqdm_monitor']
  for thread in started:  # a closed thread pool lets its threads finish the item in hand
    thread.join(timeout=10)
  left = [t.name for t in started if t.is_alive()]
  assert not left, f'threads left running: {left}'
  folder = RunFolder(str(tmp_path))
  assert [line['step'] for line in folder.logged_lines()] == [1, 2]
  checkpoints = folder.read_checkpoints()
  assert checkpoints.all_steps() == [2]  # the save of step 2 is complete on disk
  checkpoints.close()
