"""AdapterHub (`adapters` 1.3.0) ReFT files: LoReftConfig and NoReftConfig adapters.

`save_adapter(..., use_safetensors=True)` of a ReFT adapter writes `adapter_config.json`
(its ReftConfig fields under "config", with "architecture": "reft") and
`adapter.safetensors` with, per chosen layer l and unit u (0 prefix, 1 suffix; one unit when
`tied_weights`), under `model.layers.{l}.reft_layer.refts.{name}.units.{u}.`:

  learned_source.weight [r, D] = W (our source_kernel[l, u]ᵀ), learned_source.bias [r] = b
  orthogonality true:   projection.parametrizations.weight.original [r, D] = X
                        projection.parametrizations.weight.0.base [D, D]   (torch's trivialization)
  orthogonality false:  projection.weight [r, D] = R

AdapterHub computes R = (base · H(X)ᵀ)ᵀ, H the householder map of reft.py. Reading folds the
base into X: R from the file, then X' with H(X') = R (torch's `right_inverse` without a
base: LAPACK geqrf of Rᵀ, the diagonal set to its signs), so logits agree to rounding and
the leaves keep no D×D matrix. Writing writes base = I, so AdapterHub computes H(X).

DiReFT is not written: AdapterHub's ReftConfig holds `subtract_projection` as a class
attribute, not a field, so it is never saved and `load_adapter` rebuilds every ReFT file
with it true: a DiReFT file would load there as NoReFT, another function. A file whose
"orthogonality" is false is read as NoReFT, as AdapterHub reads it. `dropout` (AdapterHub's
default 0.05) acts in training only and is not read; `dtype` is not read (leaves are fp32).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg

from additive_jax.peft.files.file_io import (AdapterFileError, join_problems, read_tensors,
                                             shape_problems, write_json, write_tensors)
from additive_jax.peft.reft import ORTHOGONAL, ReFT, orthonormal_rows

TO_HUB_ACTIVATION = {None: None, 'relu': 'relu', 'gelu': 'gelu', 'silu': 'silu'}
FROM_HUB_ACTIVATION = {None: None, 'relu': 'relu', 'gelu': 'gelu', 'silu': 'silu', 'swish': 'silu'}


def unit_names(name: str, layer: int, unit: int, orthogonal: bool) -> dict[str, str]:
  """Our leaf -> AdapterHub's tensor name, for one unit of one layer."""
  prefix = f'model.layers.{layer}.reft_layer.refts.{name}.units.{unit}.'
  projection = ({'original': prefix + 'projection.parametrizations.weight.original',
                 'base': prefix + 'projection.parametrizations.weight.0.base'} if orthogonal
                else {'projection': prefix + 'projection.weight'})
  return {'source_kernel': prefix + 'learned_source.weight',
          'source_bias': prefix + 'learned_source.bias', **projection}


def save(directory, method: ReFT, tree, config, name, version, base_model_name_or_path=None):
  if method.kind == 'direft':
    raise AdapterFileError(
        f'{method.call_string()} is not written as an AdapterHub adapter: AdapterHub does not '
        'save subtract_projection, so its load_adapter would read DiReFT as NoReFT (another '
        'function); save it with format="aj"')
  orthogonal, d = ORTHOGONAL[method.kind], config.hidden_size
  tensors = {}
  for i, layer in enumerate(method.chosen_layers(config)):
    for unit in range(method.units):
      names = unit_names(name, layer, unit, orthogonal)
      tensors[names['source_kernel']] = np.asarray(tree['source_kernel'][i, unit], np.float32).T
      tensors[names['source_bias']] = np.asarray(tree['source_bias'][i, unit], np.float32)
      if orthogonal:
        tensors[names['original']] = np.asarray(tree['original'][i, unit], np.float32)
        tensors[names['base']] = np.eye(d, dtype=np.float32)
      else:
        tensors[names['projection']] = np.asarray(tree['projection'][i, unit], np.float32)
  write_tensors(os.path.join(directory, 'adapter.safetensors'), tensors, {'format': 'pt'})
  layers = 'all' if method.layers is None else list(method.layers)
  write_json(os.path.join(directory, 'adapter_config.json'), {
      'config': {'architecture': 'reft', 'dropout': 0.0, 'dtype': None, 'init_weights_seed': None,
                 'layers': layers, 'non_linearity': TO_HUB_ACTIVATION[method.activation],
                 'orthogonality': orthogonal, 'output_reft': True,
                 'prefix_positions': method.prefix_positions, 'r': method.rank,
                 'suffix_positions': method.suffix_positions, 'tied_weights': method.tied},
      'hidden_size': d, 'model_class': 'LlamaForCausalLM',
      'model_name': base_model_name_or_path or '', 'model_type': 'llama', 'name': name,
      'version': version})


def _method(settings, path) -> ReFT:
  activation = settings.get('non_linearity')
  activation = activation.lower() if isinstance(activation, str) else activation
  if activation not in FROM_HUB_ACTIVATION:
    raise AdapterFileError(f'{path}: non_linearity {activation!r} is not one of '
                           f'{", ".join(map(str, FROM_HUB_ACTIVATION))}')
  if settings.get('output_reft', True) is not True:
    raise AdapterFileError(f'{path}: output_reft={settings["output_reft"]!r}; only interventions '
                           "on the layers' outputs are read")
  layers = settings.get('layers', 'all')
  try:
    return ReFT(rank=settings.get('r'), layers=None if layers == 'all' else layers,
                prefix_positions=settings.get('prefix_positions', 0),
                suffix_positions=settings.get('suffix_positions', 0),
                kind='loreft' if settings.get('orthogonality') else 'noreft',
                tied=bool(settings.get('tied_weights', False)),
                activation=FROM_HUB_ACTIVATION[activation])
  except (TypeError, ValueError) as err:
    raise AdapterFileError(f'{path}: {err}') from None


def householder_parameter(rows_rD: np.ndarray) -> np.ndarray:
  """X [r, D] with orthonormal_rows(X) = `rows_rD` (orthonormal rows): torch's `right_inverse`
  of the householder map without a base."""
  (packed_Dr, tau_r), _ = scipy.linalg.qr(np.asarray(rows_rD, np.float64).T, mode='raw')
  r = rows_rD.shape[0]
  x_Dr = np.tril(packed_Dr[:, :r], -1)
  signs_r = np.sign(np.diagonal(packed_Dr[:r, :r]))
  signs_r[tau_r == 0.0] *= -1  # a skipped reflector, which the map writes as τ = 2: a flip
  x_Dr[np.arange(r), np.arange(r)] = signs_r
  return x_Dr.T


def load(directory, raw, config, allow_pickle, path):
  """(ReFT, tree) from an AdapterHub ReFT adapter directory (`raw` its config JSON)."""
  method = _method(raw['config'], path)
  problems = []
  if raw.get('hidden_size', config.hidden_size) != config.hidden_size:
    problems.append(f'the adapter was saved for hidden_size={raw["hidden_size"]} '
                    f'(this model: {config.hidden_size})')
  try:
    method.check(config)
  except ValueError as err:
    problems.append(str(err))
  if problems:
    raise AdapterFileError(f'{path}: {join_problems(problems)}')
  tensors, weights_path = read_tensors(directory, 'adapter.safetensors', 'pytorch_adapter.bin',
                                       allow_pickle)
  tensors = {(n if n.startswith('model.') else 'model.' + n): t for n, t in tensors.items()}
  d, r, orthogonal = config.hidden_size, method.rank, ORTHOGONAL[method.kind]
  shapes = {'source_kernel': (r, d), 'source_bias': (r,), 'original': (r, d), 'base': (d, d),
            'projection': (r, d)}
  layers = method.chosen_layers(config)
  names = {(i, u): unit_names(raw['name'], layer, u, orthogonal)
           for i, layer in enumerate(layers) for u in range(method.units)}
  problems = shape_problems({hub: shapes[leaf] for per_unit in names.values()
                             for leaf, hub in per_unit.items()}, tensors)
  if problems:
    raise AdapterFileError(f'{weights_path} does not fit this model ({method.call_string()}): '
                           f'{join_problems(problems)}')
  def leaf(name, transform=lambda x: x):  # [n, u, ...] from each unit's tensor
    return np.stack([np.stack([transform(np.asarray(tensors[names[i, u][name]], np.float32))
                               for u in range(method.units)]) for i in range(len(layers))])
  tree = {'source_kernel': leaf('source_kernel', np.transpose), 'source_bias': leaf('source_bias')}
  if not orthogonal:
    return method, {**tree, 'projection': leaf('projection')}
  rows = np.asarray(orthonormal_rows(leaf('original')), np.float64)  # H(X), [n, u, r, D]
  base = leaf('base').astype(np.float64)
  folded = np.einsum('nurd,nued->nure', rows, base)  # (base · H(X)ᵀ)ᵀ
  original = np.stack([np.stack([householder_parameter(folded[i, u]) for u in range(method.units)])
                       for i in range(len(layers))])
  return method, {**tree, 'original': original.astype(np.float32)}
