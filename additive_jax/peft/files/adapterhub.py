"""AdapterHub (`adapters`) bottleneck adapter files: `adapter_config.json` + `adapter.safetensors`.

What `model.save_adapter(dir, name, use_safetensors=True)` writes for a
`LlamaForCausalLM` (adapters 1.3.0), and `model.load_adapter(dir,
use_safetensors=True)` reads. The JSON is `build_full_config`'s: `config` (every
`BnConfig` field), `hidden_size`, `model_class`, `model_name`, `model_type`,
`name`, `version`. The placements are AdapterHub's three bottleneck configs,
which differ from `BnConfig`'s defaults in these fields:

  ours        AdapterHub            mh_adapter  original_ln_before  is_parallel  init_weights
  pfeiffer    seq_bn (SeqBnConfig)        false   true                false        bert
  houlsby     double_seq_bn               true    false               false        bert
  parallel    par_bn (ParBnConfig)        false   false               true         mam_adapter

and share output_adapter = original_ln_after = residual_before_ln = true, no
layer norms, gating, PHM or invertible adapters. On Llama (no layer norm in the
residual path) these compute exactly our placements (see bottleneck.py).
`scaling` is always written, as a float (AdapterHub refuses an integer one),
and `reduction_factor` is one that AdapterHub floors back to the trained
width: int(D // reduction_factor) == dim.

Tensors, per layer l and site (`output_adapters` after the MLP, also
`attention_adapters` after attention for houlsby), with the adapter's name:

  model.layers.{l}.output_adapters.adapters.{name}.adapter_down.0.weight [R, D] = down[l]ᵀ
  ...adapter_down.0.bias [R], ...adapter_up.weight [D, R] = up[l]ᵀ, ...adapter_up.bias [D]

Reading accepts these three configs only (any activation among relu, gelu,
swish/silu, any float scaling and width) and names the field that differs. With
`phm_layer: true` they are Compacter adapters (CompacterConfig, CompacterPlusPlusConfig),
whose fields and tensors adapterhub_compacter.py maps.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.compacter import Compacter
from additive_jax.peft.files import adapterhub_compacter, adapterhub_reft
from additive_jax.peft.reft import ReFT
from additive_jax.peft.files.file_io import (AdapterFileError, join_problems, read_json,
                                             read_tensors, shape_problems, write_json,
                                             write_tensors)

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter.safetensors'
PICKLE_NAME = 'pytorch_adapter.bin'
ADAPTER_NAME = 'bottleneck'          # the name AdapterHub loads our adapter under
FORMAT_VERSION = 'adapters.1.3.0'    # the AdapterHub release whose files these match
SITE_MODULES = {'attn': 'attention_adapters', 'mlp': 'output_adapters'}
TO_HUB_ACTIVATION = {'relu': 'relu', 'gelu': 'gelu', 'silu': 'swish'}
FROM_HUB_ACTIVATION = {'relu': 'relu', 'gelu': 'gelu', 'swish': 'silu', 'silu': 'silu'}
LEGACY_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_orig': 'gelu'}  # files without "version"

BN_CONFIG = {  # AdapterHub's BnConfig as it saves it, with the fields every placement shares
    'adapter_residual_before_ln': False, 'cross_adapter': False, 'dropout': 0.0,
    'factorized_phm_W': True, 'factorized_phm_rule': False,
    'hypercomplex_nonlinearity': 'glorot-uniform', 'init_weights': 'bert', 'init_weights_seed': None,
    'inv_adapter': None, 'inv_adapter_reduction_factor': None, 'is_parallel': False,
    'learn_phm': True, 'leave_out': [], 'ln_after': False, 'ln_before': False, 'mh_adapter': False,
    'non_linearity': 'relu', 'original_ln_after': True, 'original_ln_before': False,
    'output_adapter': True, 'phm_bias': True, 'phm_c_init': 'normal', 'phm_dim': 4,
    'phm_init_range': 0.0001, 'phm_layer': False, 'phm_rank': 1, 'reduction_factor': 16,
    'residual_before_ln': True, 'scaling': 1.0, 'shared_W_phm': False, 'shared_phm_rule': True,
    'stochastic_depth': 0.0, 'use_gating': False}
PLACEMENT_CONFIGS = {
    'pfeiffer': {'original_ln_before': True},
    'houlsby': {'mh_adapter': True},
    'parallel': {'is_parallel': True, 'init_weights': 'mam_adapter'},
}
# fields that add parameters or change the computation: each must keep BnConfig's value
FIXED_FIELDS = ('original_ln_after', 'residual_before_ln', 'ln_before', 'ln_after', 'use_gating',
                'phm_layer', 'inv_adapter', 'leave_out', 'output_adapter')


def reduction_factor(hidden: int, dim: int) -> float | int:
  """A reduction factor that AdapterHub floors back to `dim`: int(hidden // rf) == dim."""
  if hidden % dim == 0:
    return hidden // dim
  rf = hidden / dim
  while int(hidden // rf) < dim:  # hidden / (hidden / dim) may round to just under dim
    rf = math.nextafter(rf, 0.0)
  return rf


def tensor_names(name: str, site: str, layer: int) -> dict[str, str]:
  """Our leaf name -> AdapterHub's tensor name, for one adapter."""
  prefix = f'model.layers.{layer}.{SITE_MODULES[site]}.adapters.{name}.'
  return {'down': prefix + 'adapter_down.0.weight', 'down_bias': prefix + 'adapter_down.0.bias',
          'up': prefix + 'adapter_up.weight', 'up_bias': prefix + 'adapter_up.bias'}


def save(directory, method, tree, config, base_model_name_or_path=None) -> None:
  if isinstance(method, ReFT):
    return adapterhub_reft.save(directory, method, tree, config, 'reft', FORMAT_VERSION,
                                base_model_name_or_path)
  if isinstance(method, Compacter):
    tensors = adapterhub_compacter.hub_tensors(method, tree, ADAPTER_NAME, config)
    fields = adapterhub_compacter.hub_fields(method, config)
  elif isinstance(method, Bottleneck):
    tensors, fields = _bottleneck_tensors(method, tree, config)
  else:
    raise AdapterFileError(f'{method.call_string()} is not written as an AdapterHub adapter; '
                           'AdapterHub files hold the bottleneck adapters (Pfeiffer, Houlsby, '
                           'parallel), Compacter, LoReFT and NoReFT; use format="aj" or "hf_peft"')
  write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, {'format': 'pt'})
  write_json(os.path.join(directory, CONFIG_NAME), {
      'config': dict(sorted({**BN_CONFIG, **PLACEMENT_CONFIGS[method.placement],
                             'non_linearity': TO_HUB_ACTIVATION[method.activation],
                             'scaling': float(method.scale), **fields}.items())),
      'hidden_size': config.hidden_size, 'model_class': 'LlamaForCausalLM',
      'model_name': base_model_name_or_path or '', 'model_type': 'llama', 'name': ADAPTER_NAME,
      'version': FORMAT_VERSION})


def _bottleneck_tensors(method, tree, config) -> tuple[dict, dict]:
  """A bottleneck's tensors, and its reduction factor as a config field."""
  hidden, dim = config.hidden_size, method.bottleneck_dim(config)
  rf = method.reduction_factor
  if rf is None or int(hidden // rf) != dim:
    rf = reduction_factor(hidden, dim)
  tensors = {}
  for site in method.sites:
    for layer in range(config.num_layers):
      for leaf, hub_name in tensor_names(ADAPTER_NAME, site, layer).items():
        value = np.asarray(tree[site][leaf][layer], np.float32)
        tensors[hub_name] = value.T if value.ndim == 2 else value  # torch Linear: [out, in]
  return tensors, {'reduction_factor': rf}


def _placement(settings, path) -> str:
  fields = {k: settings.get(k, BN_CONFIG[k]) for k in ('mh_adapter', 'original_ln_before',
                                                      'is_parallel')}
  for placement, changes in PLACEMENT_CONFIGS.items():
    wanted = {k: changes.get(k, BN_CONFIG[k]) for k in fields}
    if placement == 'parallel':  # a parallel adapter ignores original_ln_before
      wanted['original_ln_before'] = fields['original_ln_before']
    if fields == wanted:
      return placement
  raise AdapterFileError(f'{path}: {fields} is none of seq_bn (Pfeiffer), double_seq_bn (Houlsby) '
                         'and par_bn (parallel)')


def _bottleneck(raw, path, hidden) -> tuple[Bottleneck | Compacter, list[str]]:
  """The method an AdapterHub config describes, and what in it does not fit this base."""
  settings = raw['config']
  phm = settings.get('phm_layer') is True  # a Compacter
  if settings.get('architecture') not in (None, 'bottleneck'):
    raise AdapterFileError(f'{path}: architecture {settings["architecture"]!r} is not read here; '
                           'only bottleneck adapters (seq_bn, double_seq_bn, par_bn) and reft')
  # an empty value (null, [], false) stands for an empty default: leave_out null is leave_out []
  changed = [f'{k}={settings.get(k, BN_CONFIG[k])!r} (needs {BN_CONFIG[k]!r})' for k in FIXED_FIELDS
             if settings.get(k, BN_CONFIG[k]) != BN_CONFIG[k] and (settings[k] or BN_CONFIG[k])
             and not (phm and k == 'phm_layer')]
  if changed:
    raise AdapterFileError(f'{path}: {", ".join(changed)}: not a plain seq_bn, double_seq_bn or '
                           'par_bn adapter')
  activation = str(settings.get('non_linearity')).lower()
  if 'version' not in raw:  # adapter-transformers files: "gelu" meant the tanh approximation
    activation = LEGACY_ACTIVATIONS.get(activation, activation)
  rf, scale = settings.get('reduction_factor'), settings.get('scaling', 1.0)
  if activation not in FROM_HUB_ACTIVATION:
    raise AdapterFileError(f'{path}: non_linearity {activation!r} is not one of '
                           f'{", ".join(FROM_HUB_ACTIVATION)}')
  for field, value in (('reduction_factor', rf), ('scaling', scale)):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      raise AdapterFileError(f'{path}: {field}={value!r}; only a single number is read here')
  problems = []
  if raw.get('hidden_size', hidden) != hidden:
    problems.append(f'the adapter was saved for hidden_size={raw["hidden_size"]} '
                    f'(this model: {hidden})')
  if raw.get('model_type', 'llama') != 'llama':
    problems.append(f'the adapter was saved for model_type={raw["model_type"]!r}, not llama')
  try:
    common = dict(placement=_placement(settings, path), activation=FROM_HUB_ACTIVATION[activation],
                  scale=float(scale))
    if phm:
      return adapterhub_compacter.method_from_hub(settings, BN_CONFIG, path, reduction_factor=rf,
                                                  **common), problems
    method = Bottleneck(dim=int(hidden // rf), **common)
  except (ValueError, ZeroDivisionError) as err:
    raise AdapterFileError(f'{path}: {err}') from None
  return method, problems


def load(directory, config, allow_pickle=False):
  """(method, tree) from an AdapterHub adapter directory, checked against the base `config`."""
  path = os.path.join(directory, CONFIG_NAME)
  raw = read_json(path)
  if not isinstance(raw.get('config'), dict) or not isinstance(raw.get('name'), str):
    raise AdapterFileError(f'{path}: not an AdapterHub adapter config (no "config" object and '
                           '"name")')
  if raw['config'].get('architecture') == 'reft':
    return adapterhub_reft.load(directory, raw, config, allow_pickle, path)
  method, problems = _bottleneck(raw, path, config.hidden_size)
  tensors, weights_path = read_tensors(directory, WEIGHTS_NAME, PICKLE_NAME, allow_pickle)
  # saved from a LlamaModel (no LM head), the names lack the "model." of LlamaForCausalLM
  tensors = {(n if n.startswith('model.') else 'model.' + n): t for n, t in tensors.items()}
  if isinstance(method, Compacter):
    try:
      method.check(config)
    except ValueError as err:
      problems.append(str(err))
    _raise_if_any(problems, weights_path, method)
    names = adapterhub_compacter.hub_names(method, raw['name'], config)
    problems += shape_problems({hub: shape for hub, (_, _, shape) in names.items()}, tensors)
    _raise_if_any(problems, weights_path, method)
    return method, adapterhub_compacter.tree_from_hub(names, tensors)
  d, r = config.hidden_size, method.bottleneck_dim(config)
  shapes = {'down': (r, d), 'down_bias': (r,), 'up': (d, r), 'up_bias': (d,)}
  names = {(site, layer): tensor_names(raw['name'], site, layer)
           for site in method.sites for layer in range(config.num_layers)}
  problems += shape_problems({hub: shapes[leaf] for per_adapter in names.values()
                              for leaf, hub in per_adapter.items()}, tensors)
  _raise_if_any(problems, weights_path, method)
  tree = {site: {leaf: np.stack([tensors[names[site, l][leaf]] for l in range(config.num_layers)])
                 for leaf in shapes} for site in method.sites}
  for leaves in tree.values():  # torch Linear [out, in] -> our kernels [in, out]
    leaves['down'], leaves['up'] = leaves['down'].transpose(0, 2, 1), leaves['up'].transpose(0, 2, 1)
  return method, tree


def _raise_if_any(problems, weights_path, method) -> None:
  if problems:
    raise AdapterFileError(f'{weights_path} does not fit this model ({method.call_string()}): '
                           f'{join_problems(problems)}')
