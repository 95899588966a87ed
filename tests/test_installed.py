"""The package as installed, used from a folder outside the checkout, as a user would.

The README's test command installs the project non-editable (`pip install '.[test]'`) and
runs pytest with PYTHONSAFEPATH=1, so neither the tests nor the commands they start import
the checkout's folder: every test runs against the installed package.

A user's venv, installed as the README says, has no torch (a test extra). The commands
here run in such a venv: a venv whose site-packages holds every package of the test
environment but torch, so that what a user reads is what these tests read.
"""

import collections
import json
import os
import re
import subprocess
import sys
import sysconfig

import pytest

import additive_jax
from cli_helpers import ROOT
from conftest import SHARED_DATA, xla_flags

PACKAGE = os.path.join(ROOT, 'additive_jax')
NOISE = ('PyTorch was not found', 'Unable to initialize backend', 'Traceback', 'INFO:absl')
LOGGER_PREFIX = re.compile(r'^[IWEF]\d{4} |^(INFO|WARNING|ERROR):')  # absl's and logging's


def checkout_modules() -> list[str]:
  names = []
  for folder, _, files in os.walk(PACKAGE):
    package = os.path.relpath(folder, ROOT).replace(os.sep, '.')
    names += [package if f == '__init__.py' else f'{package}.{f[:-3]}'
              for f in files if f.endswith('.py')]
  return sorted(names)


def test_every_package_folder_is_a_package():
  """setuptools.find_packages skips a folder without __init__.py, and `pip install .` with it."""
  for folder, _, files in os.walk(PACKAGE):
    if any(f.endswith('.py') for f in files) and '__pycache__' not in folder:
      assert '__init__.py' in files, folder


@pytest.fixture(scope='module')
def user_python(tmp_path_factory):
  """The interpreter of a venv with every package of this one but torch (linked, not copied)."""
  venv = tmp_path_factory.mktemp('user_venv')
  subprocess.run([sys._base_executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  theirs = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                          check=True, capture_output=True, text=True).stdout.strip()
  ours = sysconfig.get_path('purelib')
  for name in os.listdir(ours):
    if not re.match(r'(torch|torchgen|functorch)($|-)', name):
      os.symlink(os.path.join(ours, name), os.path.join(theirs, name))
  hidden = subprocess.run([python, '-c', 'import torch'], capture_output=True, text=True)
  assert 'No module named' in hidden.stderr
  return python


def run(python, args, cwd):
  """A command of the installed package, with the data folder left to its default."""
  env = {name: value for name, value in os.environ.items() if name != 'ADDITIVE_JAX_DATA'}
  env['XLA_FLAGS'] = xla_flags(1)
  return subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=env)


def assert_quiet(result):
  """What a user reads: no line twice, none with a logger's prefix, no noise on stderr."""
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  repeated = [line for line, n in collections.Counter(lines).items() if n > 1]
  assert not repeated, repeated
  assert not [line for line in lines if LOGGER_PREFIX.match(line)], result.stdout
  assert not any(noise in result.stderr for noise in NOISE), result.stderr[-3000:]


def test_commands_run_from_outside_the_checkout(tmp_path, tiny_with_tokenizer, user_python):
  """From a folder with ../shared/data beside it, in a venv without torch, the installed package
  has every module of the checkout, and each command starts and does its work quietly: `count`
  counts, a runlocal training reads its data from the default folder, and `evaluate`,
  `generate`, `export` and `launch --dry-run` read its run."""
  work = tmp_path / 'work'
  work.mkdir()
  (tmp_path / 'shared').mkdir()
  os.symlink(SHARED_DATA, tmp_path / 'shared' / 'data')

  listed = run(user_python, ['-c', 'import additive_jax, pkgutil; print("\\n".join(sorted('
                             '["additive_jax"] + [m.name for m in pkgutil.walk_packages('
                             'additive_jax.__path__, "additive_jax.")])))'], work)
  assert listed.returncode == 0, listed.stderr
  assert listed.stdout.split() == checkout_modules()

  counted = run(user_python, ['-m', 'additive_jax.count', '--config=smollm2-135m-instruct',
                              '--peft=Bottleneck(dim=64)', '--peft=IA3()'], work)
  assert_quiet(counted)
  assert 'Bottleneck(dim=64)      2,231,040' in counted.stdout

  trained = run(user_python, ['-m', 'additive_jax.main',
                              f'--config={ROOT}/configs/sst2.py:ia3,runlocal', '--workdir=run',
                              f'--config.model={tiny_with_tokenizer}'], work)
  assert_quiet(trained)
  assert 'sst2 train: 60614 examples' in trained.stdout  # the whole train split, from ../shared
  summary = json.loads((work / 'run' / 'summary.json').read_text())
  assert 0 <= summary['accuracy_after'] <= 1

  for command in (['evaluate', '--limit=4'],
                  ['generate', '--prompt=Review: fine\nSentiment:', '--max_new_tokens=2'],
                  ['export', '--format=aj']):
    assert_quiet(run(user_python, ['-m', f'additive_jax.{command[0]}', '--workdir=run',
                                   *command[1:]], work))
  assert_quiet(run(user_python, ['-m', 'additive_jax.launch', 'local', '--processes=2',
                                 '--dry-run', '--', f'--config={ROOT}/configs/sst2.py:ia3'], work))


def test_the_data_folder_is_chosen_in_the_documented_order(tmp_path, monkeypatch):
  from additive_jax.data.config import data_dir
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv('ADDITIVE_JAX_DATA', raising=False)
  assert data_dir() == os.path.join(os.path.dirname(tmp_path), 'shared', 'data')
  monkeypatch.setenv('ADDITIVE_JAX_DATA', '/data/from/env')
  assert data_dir() == '/data/from/env'
  assert data_dir('/data/from/config') == '/data/from/config'


def test_the_version_is_the_installed_distribution():
  import importlib.metadata
  assert additive_jax.__version__ == importlib.metadata.version('additive_jax')
