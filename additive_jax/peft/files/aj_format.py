"""Our own adapter files: `aj_adapter_config.json` + `aj_adapter.safetensors`, any method set.

The safetensors file holds every leaf of `variables['peft']`, fp32, named by its
path in the tree (`bottleneck/mlp/down` [L, D, R], `prefix/k_LPKH`, ...), exactly as
trained (a prefix with a reparameterization MLP keeps it). The JSON is readable at
a glance: one record per method, in the model's order, e.g.

    {"method": "Bottleneck(dim=64, activation='gelu')", "adapter_type": "bottleneck",
     "bottleneck_dim": 64, "non_linearity": "gelu", "adapter_placement": "after_ffn", ...}

plus `base_model_name_or_path`, the base's shape facts (`base_model`) and
`library_version`. The `method` constructor call is what `load` rebuilds the
method from (`registry.parse_method`); the other fields are for the reader.
Loading checks every tensor's shape against the leaves the methods build on the
given base, and the recorded shape facts against it, and names what differs.
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
from flax import traverse_util

from additive_jax.peft.param_count import leaf_shapes
from additive_jax.peft.files.file_io import (AdapterFileError, join_problems, read_json,
                                             read_tensors, shape_problems, write_json,
                                             write_tensors)
from additive_jax.peft.registry import parse_method

CONFIG_NAME = 'aj_adapter_config.json'
WEIGHTS_NAME = 'aj_adapter.safetensors'
BASE_FACTS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
              'num_kv_heads', 'head_dim')


def flat_leaves(methods, peft) -> dict[str, np.ndarray]:
  """'key/path/to/leaf' -> fp32 array for the methods' subtrees of `peft`."""
  flat = traverse_util.flatten_dict({m.key: peft[m.key] for m in methods}, sep='/')
  return {name: np.asarray(leaf, np.float32) for name, leaf in flat.items()}


def save(directory, methods, peft, config, base_model_name_or_path=None) -> None:
  write_tensors(os.path.join(directory, WEIGHTS_NAME), flat_leaves(methods, peft))
  write_json(os.path.join(directory, CONFIG_NAME), {
      'library_version': importlib.metadata.version('additive_jax'),
      'base_model_name_or_path': base_model_name_or_path,
      'base_model': {fact: getattr(config, fact) for fact in BASE_FACTS},
      'methods': [{'method': m.call_string(), **m.file_fields(config),
                   'num_params': m.num_params(config),
                   **({'num_frozen_params': m.num_frozen_params(config)}
                      if getattr(m, 'frozen_keys', ()) else {})} for m in methods]})


def load(directory, config):
  """(methods, peft) from `directory`, checked against the base `config`."""
  path = os.path.join(directory, CONFIG_NAME)
  record = read_json(path)
  entries = record.get('methods')
  if not (isinstance(entries, list) and entries and
          all(isinstance(e, dict) and isinstance(e.get('method'), str) for e in entries)):
    raise AdapterFileError(f'{path}: "methods" must be a non-empty list of records, each with '
                           'its constructor call under "method"')
  try:
    methods = tuple(parse_method(entry['method']) for entry in entries)
  except (ValueError, TypeError) as err:
    raise AdapterFileError(f'{path}: {err}') from None
  except RecursionError:  # ast.parse of a call nested past the recursion limit
    raise AdapterFileError(f'{path}: a "method" call nests too deeply to parse') from None
  saved_base = record.get('base_model') or {}
  if not isinstance(saved_base, dict):
    raise AdapterFileError(f'{path}: "base_model" must be an object of the base\'s shape facts '
                           f'({", ".join(BASE_FACTS)}), got {saved_base!r:.80}')
  tensors, weights_path = read_tensors(directory, WEIGHTS_NAME)
  differing = [f'{fact}={saved_base[fact]} (this model: {getattr(config, fact)})'
               for fact in BASE_FACTS
               if fact in saved_base and saved_base[fact] != getattr(config, fact)]
  problems = [f'the adapter was saved for a base with {", ".join(differing)}'] if differing else []
  problems += shape_problems(leaf_shapes(methods, config), tensors)
  if problems:
    calls = ', '.join(m.call_string() for m in methods)
    raise AdapterFileError(f'{weights_path} does not fit this model ({calls}): '
                           f'{join_problems(problems)}')
  return methods, traverse_util.unflatten_dict(tensors, sep='/')
