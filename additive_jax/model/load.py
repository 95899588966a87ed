"""`load_model(path) -> (config, params)` for every kind of checkpoint we read.

`path` is a Hugging Face checkpoint directory, a `.gguf` file, or the name of
the embedded default, "smollm2-135m-instruct". Keyword overrides go to the
`LlamaConfig` (e.g. `param_dtype=jnp.bfloat16`, `remat='full'`).

The weights come back as `jax.Array`s, placed once: on the default device, or
shard by shard onto `shardings` (the trainer's mesh). A host (numpy) array
would instead be copied into every jitted call that reads it, which for a
decode step means reading all of the weights from host memory a second time.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from additive_jax.model import embedded
from additive_jax.model.config import LlamaConfig
from additive_jax.model.gguf_checkpoint import config_from_gguf, load_gguf, open_gguf
from additive_jax.model.hf_checkpoint import (load_hf_directory, read_config_json,
                                               read_hf_config)


def resolve(path: str) -> str:
  """The file or directory a model name or path stands for."""
  if path == embedded.NAME:
    return embedded.smollm2_gguf()
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path!r} (expected an HF directory, a .gguf file '
                            f'or {embedded.NAME!r})')
  return path


def load_config(path: str, **overrides) -> LlamaConfig:
  """The model config alone, no weights read: from a `config.json`, an HF directory, a
  `.gguf` file's metadata, or the embedded default."""
  path = resolve(path)
  if path.endswith('.json'):
    return read_config_json(path, **overrides)
  if os.path.isdir(path):
    return read_hf_config(path, **overrides)
  if path.endswith('.gguf'):
    return config_from_gguf(open_gguf(path), path, **overrides)
  raise ValueError(f'{path}: not a config.json, a directory or a .gguf file')


def load_model(path: str, allow_pickle: bool = False, shardings=None, **overrides):
  """(config, params on devices) from an HF directory, a `.gguf` file or the embedded default;
  `shardings`: one `jax.sharding.Sharding` per weight (a tree like the params), or None for
  the default device."""
  path = resolve(path)
  if os.path.isdir(path):
    config, host_params = load_hf_directory(path, allow_pickle=allow_pickle, **overrides)
  elif path.endswith('.gguf'):
    config, host_params = load_gguf(path, **overrides)
  else:
    raise ValueError(f'{path}: not a directory or a .gguf file')
  return config, place(host_params, shardings)


def place(tree, shardings=None):
  """Host arrays on devices, each copied once. With `shardings` (a tree like `tree`) every
  device receives only its own shards (no device holds a whole copy of a sharded weight)."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)

  def put(array, sharding):
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return jax.tree.map(put, tree, shardings)
