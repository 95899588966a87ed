"""Shared by the tests that run the trainer: the repository root, the experiment configs, the
CLI in a subprocess, and the config of a run in the test process."""

import importlib.util
import os
import subprocess
import sys

from additive_jax.train.config import entries_of
from additive_jax.train.loop import train_and_evaluate
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
# The environment of a user's shell in the checkout, for `python -m experiments.*` (run from
# the root, which must be on the path): without the suite's PYTHONSAFEPATH.
USER_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONSAFEPATH'}


def experiment_config(name, arg):
  """`get_config(arg)` of configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def sst2_config(arg='pfeiffer,runlocal'):
  return experiment_config('sst2', arg)


def run_main(workdir, *overrides, log=None):
  """The CLI's CompletedProcess; with `log` (a file), a running Popen writing to it instead."""
  args = [sys.executable, '-m', 'additive_jax.main', '--config=configs/sst2.py:pfeiffer,runlocal',
          f'--workdir={workdir}', '--config.peft.bottleneck.dim=8', *overrides]
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  if log is not None:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def in_process_config(model, data_dir, methods):
  """A run of `methods` (aj.peft objects) in this process: 8 devices, one row each."""
  config = sst2_config()
  config.model, config.data.data_dir, config.test_metric = model, data_dir, ''
  config.batch_size, config.peft = 8, entries_of(methods)
  return config


def moving_run(model, data_dir, method, directory, steps=2):
  """Trains `method` (one aj.peft method) for `steps` steps in this process at a constant, high
  learning rate, so that its adapter moves well off its identity init; returns `directory`."""
  config = in_process_config(model, data_dir, [method])
  config.seq_len, config.num_steps, config.checkpoint_every = 32, steps, steps
  config.peft[method.key].optimizer.learning_rate = 0.05
  config.peft[method.key].optimizer.schedule = 'constant'
  train_and_evaluate(config, str(directory))
  return str(directory)
