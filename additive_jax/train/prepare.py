"""Everything a run needs before its first step, checked before any compute.

`check_config` refuses a bad config with the key at fault (the mesh, the batch,
the data files, the optimizer's method keys) before a weight is read; `build`
then loads the tokenizer and the base onto the mesh, builds the model from the
config's methods, the optimizer and the trainable state.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from additive_jax.data.sources import source_spec
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_config
from additive_jax.model.tokenizer import load_tokenizer
from additive_jax.peft.registry import check_methods, parse_method
from additive_jax.train import mesh as mesh_lib
from additive_jax.train.model_state import create_train_state, load_base
from additive_jax.train.optimizer import DEFAULT_LEARNING_RATES, method_settings, run_optimizer

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass
class Run:
  """The pieces of a run: what `build` returns and the loop uses."""
  mesh: Mesh
  tokenizer: object
  model: Llama
  params: dict
  param_shardings: dict
  optimizer: object
  optimizer_settings: dict
  state: object
  state_shardings: object


def check_config(config: ml_collections.ConfigDict) -> tuple[Mesh, tuple]:
  """(the mesh, the methods) of a config whose every checkable key is valid."""
  for key in ('dtype', 'param_dtype'):
    if config[key] not in _DTYPES:
      raise ValueError(f'config.{key} must be one of {", ".join(_DTYPES)}, got {config[key]!r}')
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
  spec = source_spec(config.data.source)
  for key in ('split', 'eval_split'):
    path = spec.path(config.data.data_dir, config.data[key])
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config.data.{key}={config.data[key]!r}: no data file {path}')
  if config.accuracy_split:
    spec.path(config.data.data_dir, config.accuracy_split)
  methods = tuple(parse_method(text) for text in config.peft)
  if not methods:
    raise ValueError('config.peft names no method: nothing would train')
  stray = set(config.optimizer) - set(DEFAULT_LEARNING_RATES)
  if stray:
    raise ValueError(f'config.optimizer has settings for {sorted(stray)}, which is no method key '
                     f'(method keys: {", ".join(DEFAULT_LEARNING_RATES)})')
  for key, overrides in config.optimizer.items():
    unknown = set(overrides) - set(method_settings(key))
    if unknown:
      raise ValueError(f'config.optimizer.{key} has unknown keys {sorted(unknown)}; '
                       f'known: {sorted(method_settings(key))}')
  check_methods(methods, load_config(config.model))  # the model's config alone: no weights read
  return mesh, methods


def build(config: ml_collections.ConfigDict, mesh: Mesh, methods) -> Run:
  tokenizer = load_tokenizer(config.model)
  model_config, params, param_shardings, fallback = load_base(
      config.model, mesh, config.rules, dtype=_DTYPES[config.dtype],
      param_dtype=_DTYPES[config.param_dtype], remat=config.remat)
  for path, dim, size, axis in fallback:
    logging.info('replicated: %s axis %d (size %d) is not divisible by mesh axis %r',
                 path, dim, size, axis)
  model = Llama(model_config, peft=methods)
  optimizer, settings = run_optimizer(config, methods)
  state, state_shardings = create_train_state(model, params, optimizer,
                                              jax.random.key(config.seed), mesh, tokenizer)
  return Run(mesh, tokenizer, model, params, param_shardings, optimizer, settings, state,
             state_shardings)

