"""`check_config`: a bad experiment config is refused, naming its key, before anything runs.

Every check here reads the config (and at most the model's own config file, whether
the data files exist, and whether a package is importable), so a mistake costs
nothing: no weight is read, nothing is compiled. Later failures are then about
the data or the hardware, not about a typo. What a run needs installed is
checked here too: the file system of a `gs://` workdir or data file, and the
reader of a source's format.
"""

from __future__ import annotations

import importlib
import math
import os

from etils import epath
import fsspec
from fsspec.registry import known_implementations
import jax
import ml_collections
from jax.sharding import Mesh

from additive_jax.data.config import data_dir_origin, is_url
from additive_jax.data.encode import OVER_LONG_POLICIES
from additive_jax.data.mixture import mixture_entries
from additive_jax.data.sources import source_spec
from additive_jax.data.templates import TEMPLATES, check_template
from additive_jax.model.config import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_POLICIES
from additive_jax.eval.exact_match import Extractor
from additive_jax.eval.metrics import check_metric
from additive_jax.model.hooks import check_methods
from additive_jax.model.config import ConfigError
from additive_jax.model.load import base_layout, load_config
from additive_jax.peft.registry import class_for_key, method_from_fields
from additive_jax.train import mesh as mesh_lib
from additive_jax.train.loss_budget import check_setting as check_loss_positions
from additive_jax.train.optimizer import SCHEDULES, method_settings

_POSITIVE = ('batch_size', 'seq_len', 'accumulation', 'log_every', 'checkpoint_every',
             'max_new_tokens')
# implementations that run on one backend alone ('pallas' runs on GPU and TPU, and on a CPU
# only in Pallas's interpreter, which the tests use)
_ATTENTION_BACKENDS = {'cudnn': 'gpu', 'splash': 'tpu'}
_NOT_NEGATIVE = ('base_quant_block', 'num_steps', 'eval_every', 'eval_batches', 'keep_best', 'test_limit', 'eval_metric_limit')
# The extra of setup.py that installs what a file system or a format needs.
_EXTRAS = {'gcsfs': 'gcs', 'pyarrow': 'parquet'}
# Formats read by a package the install does not require (data/readers.py imports it when read).
_FORMAT_MODULES = {'parquet': 'pyarrow.parquet'}


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None
                 ) -> tuple[Mesh, tuple]:
  """(the mesh, the methods) of a config whose every checkable key is valid; with `workdir`,
  its file system is checked to be installed too."""
  _check_values(config)
  mesh = _check_mesh_and_batch(config)
  if workdir is not None:
    check_file_system(workdir, f'--workdir={workdir}')
  _check_data(config)
  methods = _check_methods_and_optimizer(config)
  return mesh, methods


def _missing_package(module: str) -> str:
  """How to install `module` (the top package's extra of this project, if it has one)."""
  package = module.split('.')[0]
  extra = _EXTRAS.get(package)
  return f"pip install '.[{extra}]'" if extra else f'pip install {package}'


def check_file_system(path: str, what: str) -> None:
  """Refuses a URL (`gs://...`) whose file system (fsspec's, as epath reaches it) is not
  installed: the ImportError would otherwise come when the first file is written."""
  if not is_url(path):
    return
  scheme = path.split('://', 1)[0]
  try:
    fsspec.get_filesystem_class(scheme)
  except ValueError:
    raise ValueError(f'{what}: no file system is known for {scheme}://') from None
  except ImportError:
    # fsspec's error names no module; its registry names the class it tried
    module = known_implementations.get(scheme, {}).get('class', scheme).split('.')[0]
    raise ValueError(f'{what}: {scheme}:// needs {module}, which is not installed: '
                     f'{_missing_package(module)}') from None


def _check_values(config) -> None:
  for key in _POSITIVE + _NOT_NEGATIVE:
    value, low = config[key], 1 if key in _POSITIVE else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f'config.{key} must be an integer ≥ {low}, got {value!r}')
  if config.keep_checkpoints < 1:
    raise ValueError(f'config.keep_checkpoints must be ≥ 1 (the latest is what resumes), '
                     f'got {config.keep_checkpoints!r}')
  for key, allowed in (('dtype', (*DTYPES, 'auto')), ('param_dtype', DTYPES),
                       ('remat', REMAT_POLICIES),
                       ('attention', ATTENTION_IMPLEMENTATIONS)):
    if config[key] not in allowed:
      raise ValueError(f'config.{key} must be one of {", ".join(allowed)}, got {config[key]!r}')
  check_loss_positions(config.loss_positions)
  if config.nonfinite not in ('stop', 'skip'):
    raise ValueError(f"config.nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
  backend, needs = jax.default_backend(), _ATTENTION_BACKENDS.get(config.attention)
  if needs and backend != needs:
    raise ValueError(f'config.attention={config.attention!r} runs on a {needs}; this run\'s '
                     f'backend is {backend} (\'auto\' picks the best it has)')
  if config.peak_tflops < 0:
    raise ValueError(f'config.peak_tflops must be ≥ 0 (0: the datasheet figure), got '
                     f'{config.peak_tflops!r}')


def _check_mesh_and_batch(config) -> Mesh:
  try:
    mesh = mesh_lib.make_mesh(config.mesh)
  except ValueError as err:
    raise ValueError(f'config.mesh: {err}') from None
  ways = math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
  if config.batch_size % ways:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the {ways} ways '
                     f'the batch is split (mesh data × fsdp = {mesh.shape["data"]} × '
                     f'{mesh.shape["fsdp"]})')
  if (config.batch_size // ways) % config.accumulation:
    raise ValueError(f'config.accumulation={config.accumulation} does not divide the '
                     f'{config.batch_size // ways} rows each device gets')
  return mesh


def _check_data(config) -> None:
  data = config.data
  for key, allowed in (('template', TEMPLATES), ('over_long', OVER_LONG_POLICIES)):
    if data[key] not in allowed:
      raise ValueError(f'config.data.{key} must be one of {", ".join(allowed)}, got {data[key]!r}')
  spec = source_spec(data.source)  # a bad declaration is named by its key
  _check_reader(spec)
  check_template(spec, data.template)
  for entry in mixture_entries(data):  # each entry's declaration and weight, named by its key
    _check_reader(entry.spec)
    _check_split_file(entry.spec, data, f'data.split={data.split!r} of {entry.spec.key}',
                      data.split)
  keys = [('data.split', data.split), ('data.eval_split', data.eval_split)]
  if config.test_metric:
    if not config.test_split:
      raise ValueError(f'config.test_metric={config.test_metric!r} needs config.test_split, the '
                       'split it is scored on')
    keys.append(('test_split', config.test_split))
  if config.test_checkpoint not in ('last', 'best'):  # train/final_test.py
    raise ValueError(f"config.test_checkpoint must be 'last' or 'best', got "
                     f'{config.test_checkpoint!r}')
  if config.test_checkpoint == 'best' and not config.keep_best:
    raise ValueError("config.test_checkpoint='best' needs config.keep_best >= 1: the best "
                     'checkpoint must be kept to be tested')
  for key in ('test_metric', 'eval_metric'):
    if config[key]:
      try:
        check_metric(config[key])
      except ValueError as err:
        raise ValueError(f'config.{key}: {err}') from None
    if config[key] == 'accuracy' and spec.label_field is None:
      raise ValueError(f'config.{key}=\'accuracy\' needs a classification source (a label map), '
                       f'and {spec.name} has no label field')
  try:
    Extractor(config.answer_regex or None)
  except ValueError as err:
    raise ValueError(f'config.answer_regex: {err}') from None
  for key, split in keys:
    _check_split_file(spec, data, f'{key}={split!r}', split)


def _check_reader(spec) -> None:
  """The package that reads the source's format, if it needs one, is installed."""
  if spec.format in _FORMAT_MODULES:
    module = _FORMAT_MODULES[spec.format]
    try:
      importlib.import_module(module)
    except ImportError:
      raise ValueError(f'{spec.key}.format={spec.format!r} is read by {module}, which is '
                       f'not installed: {_missing_package(module)}') from None


def _check_split_file(spec, data, key: str, split: str) -> None:
  """`split` is declared by the source and its file exists; `key` (after `config.`) names the
  setting that asks for it."""
  try:
    path = spec.path(data.data_dir, split)
  except ValueError as err:  # a split the source does not declare
    raise ValueError(f'config.{key}: {err}') from None
  check_file_system(path, f'config.{key}')
  if not epath.Path(path).exists():
    file = spec.splits[split].file
    where = '' if is_url(file) or os.path.isabs(file) else f'; {data_dir_origin(data.data_dir)}'
    raise FileNotFoundError(f'config.{key}: no data file {path}{where}')


def methods_of(config) -> tuple:
  """The methods of `config.peft` (a ConfigDict, or the dict a checkpoint keeps), each entry's
  error named by its key."""
  methods = []
  for key, entry in config['peft'].items():
    try:
      methods.append(method_from_fields(key, entry))
    except (ValueError, TypeError) as err:
      raise ValueError(f'config.peft.{key}: {err}') from None
  return tuple(methods)


def _check_methods_and_optimizer(config) -> tuple:
  if not config.peft:
    raise ValueError('config.peft names no method: nothing would train')
  methods = methods_of(config)
  for key, entry in config.peft.items():
    defaults = method_settings(class_for_key(key))
    overrides = entry.get('optimizer') or {}
    unknown = set(overrides) - set(defaults)
    if unknown:
      raise ValueError(f'config.peft.{key}.optimizer has unknown keys {sorted(unknown)}; '
                       f'known: {sorted(defaults)}')
    settings = {**defaults, **overrides}
    if settings['schedule'] not in SCHEDULES:
      raise ValueError(f'config.peft.{key}.optimizer.schedule must be one of '
                       f'{", ".join(SCHEDULES)}, got {settings["schedule"]!r}')
  model_config = load_config(config.model)  # the model's config alone: no weights read
  check_methods(methods, model_config)
  try:  # which weights go in blocks: from the config (and a GGUF file's tensor types) alone
    base_layout(config.model, config.base_quant, config.base_quant_block)
  except (ConfigError, ValueError) as err:
    raise ValueError(f'config.{err}' if str(err).startswith('base_quant') else
                     f'config.base_quant: {err}') from None
  acausal = next((m for m in methods if not m.causal), None)
  if acausal is not None:
    raise ValueError(f'config.peft.{acausal.key}: {acausal.call_string()} reads every token of '
                     'the sequence at each token (a causal LM trained so sees the answer it '
                     "predicts); train with gate='token'")
  virtual = sum(m.num_virtual_tokens for m in methods)
  prefix = sum(m.num_prefix_positions for m in methods)
  if config.seq_len + virtual + prefix > model_config.max_position_embeddings:
    raise ValueError(f'config.seq_len={config.seq_len} + {virtual} prompt vectors + {prefix} '
                     f'prefix positions need {config.seq_len + virtual + prefix} positions; '
                     f'{config.model} has max_position_embeddings='
                     f'{model_config.max_position_embeddings}')
  return methods
