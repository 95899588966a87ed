"""The package as installed, used from a folder outside the checkout, as a user would.

The README's test command installs the project non-editable (`pip install '.[test]'`) and
runs pytest with PYTHONSAFEPATH=1, so neither the tests nor the commands they start import
the checkout's folder: every test runs against the installed package.
"""

import json
import os
import subprocess
import sys

import additive_jax
from cli_helpers import ROOT
from conftest import SHARED_DATA, xla_flags

PACKAGE = os.path.join(ROOT, 'additive_jax')
NOISE = ('PyTorch was not found', 'Unable to initialize backend', 'Traceback', 'INFO:absl')


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


def run(args, cwd):
  """A command of the installed package, with the data folder left to its default."""
  env = {name: value for name, value in os.environ.items() if name != 'ADDITIVE_JAX_DATA'}
  env['XLA_FLAGS'] = xla_flags(1)
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=env)


def test_commands_run_from_outside_the_checkout(tmp_path, tiny_with_tokenizer):
  """From a folder with ../shared/data beside it, the installed package has every module of the
  checkout, `count` counts, and a runlocal training reads its data from the default folder."""
  work = tmp_path / 'work'
  work.mkdir()
  (tmp_path / 'shared').mkdir()
  os.symlink(SHARED_DATA, tmp_path / 'shared' / 'data')

  listed = run(['-c', 'import additive_jax, pkgutil; print("\\n".join(sorted(["additive_jax"] + '
                '[m.name for m in pkgutil.walk_packages(additive_jax.__path__, "additive_jax.")])))'],
               work)
  assert listed.returncode == 0, listed.stderr
  assert listed.stdout.split() == checkout_modules()

  counted = run(['-m', 'additive_jax.count', '--config=smollm2-135m-instruct',
                 '--peft=Bottleneck(dim=64)', '--peft=IA3()'], work)
  assert counted.returncode == 0, counted.stderr
  assert 'Bottleneck(dim=64)      2,231,040' in counted.stdout
  assert not any(noise in counted.stderr for noise in NOISE), counted.stderr

  trained = run(['-m', 'additive_jax.main', f'--config={ROOT}/configs/sst2.py:ia3,runlocal',
                 '--workdir=run', f'--config.model={tiny_with_tokenizer}'], work)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'sst2 train: 60614 examples' in trained.stdout  # the whole train split, from ../shared
  summary = json.loads((work / 'run' / 'summary.json').read_text())
  assert 0 <= summary['accuracy_after'] <= 1
  assert not any(noise in trained.stderr for noise in NOISE), trained.stderr[-3000:]


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
