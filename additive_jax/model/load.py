"""`load_model(path) -> (config, params)` for every kind of checkpoint we read.

`path` is a Hugging Face checkpoint directory, a `.gguf` file, or the name of
the embedded default, "smollm2-135m-instruct". Keyword overrides go to the
`LlamaConfig` (e.g. `param_dtype=jnp.bfloat16`, `remat='full'`). `quant` keeps the frozen
base in blocks of 8 or 4 bits (model/quant_layout.py): 'int8', 'int4', 'nf4', or 'gguf' for a
GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks, never widened on the host.

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
from additive_jax.model.gguf_checkpoint import config_from_gguf, load_gguf, open_gguf, tensor_types
from additive_jax.model.hf_checkpoint import (load_hf_directory, read_config_json,
                                               read_hf_config)
from additive_jax.model.quant_layout import Layout, layout_for


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


def base_layout(path: str, quant: str = 'none', block: int = 0, **overrides) -> Layout | None:
  """Which weights `load_model(path, quant=quant, quant_block=block)` keeps in blocks, and how
  (None for 'none'); read from the config (and a GGUF file's tensor types), no weight read."""
  if quant == 'none':  # every plain load passes here: no second read of the config
    return None
  path = resolve(path)
  config = load_config(path, **overrides)
  if quant == 'gguf' and not path.endswith('.gguf'):
    raise ValueError(f"base_quant='gguf' keeps a GGUF file's blocks; {path} is not a .gguf file "
                     "(use 'int8', 'int4' or 'nf4')")
  types = tensor_types(open_gguf(path), config) if quant == 'gguf' else None
  return layout_for(config, quant, block, types)


def load_model(path: str, allow_pickle: bool = False, shardings=None, quant: str = 'none',
               quant_block: int = 0, **overrides):
  """(config, params on devices) from an HF directory, a `.gguf` file or the embedded default;
  `shardings`: one `jax.sharding.Sharding` per weight (a tree like the params), or None for
  the default device. `quant`, `quant_block`: the base in blocks (module docstring)."""
  path = resolve(path)
  layout = base_layout(path, quant, quant_block, **overrides)
  if os.path.isdir(path):
    config, host_params = load_hf_directory(path, allow_pickle=allow_pickle, layout=layout,
                                            **overrides)
  elif path.endswith('.gguf'):
    config, host_params = load_gguf(path, layout=layout, **overrides)
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
