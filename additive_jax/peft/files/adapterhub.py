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

With `use_gating` (UniPELT) a bottleneck also has ...{name}.gate.weight [1, D] and
gate.bias [1] per adapter: our gate (adapterhub_prefix_lora.py says which).

Reading accepts these three configs only (any activation among relu, gelu,
swish/silu, any float scaling and width) and names the field that differs. With
`phm_layer: true` they are Compacter adapters (CompacterConfig, CompacterPlusPlusConfig),
whose fields and tensors adapterhub_compacter.py maps.

LoRA and prefix tuning (adapterhub_prefix_lora.py), and a `ConfigUnion` of a prefix, a
bottleneck and a LoRA (`{"architecture": "union", "configs": [...]}`: MAMConfig,
UniPELTConfig), are read and written here too: several of our methods saved together
in this format are one union adapter.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.compacter import Compacter
from additive_jax.peft.files import adapterhub_compacter, adapterhub_prefix_lora, adapterhub_reft
from additive_jax.peft.files.adapterhub_prefix_lora import GATE_KEY, hub_gate
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
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
FIXED_FIELDS = ('original_ln_after', 'residual_before_ln', 'ln_before', 'ln_after',
                'phm_layer', 'inv_adapter', 'leave_out', 'output_adapter')
UNION_ORDER = (PrefixTuning, Bottleneck, LoRA)  # as MAMConfig and UniPELTConfig list them
UNION_MODULES = {'lora': '.loras.', 'prefix_tuning': '.prefix_tuning.'}  # the rest: bottleneck


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
          'up': prefix + 'adapter_up.weight', 'up_bias': prefix + 'adapter_up.bias',
          'gate': prefix + 'gate.weight', 'gate_bias': prefix + 'gate.bias'}


def combinable(methods) -> bool:
  """Whether `methods` are one AdapterHub union: at most a prefix, a bottleneck and a LoRA."""
  return all(type(m) in UNION_ORDER for m in methods)


def save(directory, methods, peft, config, base_model_name_or_path=None,
         name: str = ADAPTER_NAME) -> None:
  """Writes `methods` (one, or a union of a prefix, a bottleneck and a LoRA) as one adapter
  named `name` (AdapterHub loads it under that name; the adapters of a fusion or a Stack need
  one each)."""
  if len(methods) == 1 and isinstance(methods[0], ReFT):
    return adapterhub_reft.save(directory, methods[0], peft[methods[0].key], config, 'reft',
                                FORMAT_VERSION, base_model_name_or_path)
  if len(methods) > 1 and not combinable(methods):
    raise AdapterFileError(f'{", ".join(m.call_string() for m in methods)}: an AdapterHub union '
                           'here holds at most a prefix, a bottleneck and a LoRA; use format="aj"')
  gates = {m.gate for m in methods if getattr(m, 'gate', '')}
  if len(gates) > 1:
    raise AdapterFileError(f'gates {sorted(gates)} in one adapter: AdapterHub\'s file says one')
  tensors, configs = {}, []
  for method in sorted(methods, key=lambda m: UNION_ORDER.index(type(m)) if type(m) in
                       UNION_ORDER else 0):
    part_tensors, part_config = _part(method, peft[method.key], config, name)
    tensors.update(part_tensors)
    configs.append(part_config)
  write_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, {'format': 'pt'})
  write_json(os.path.join(directory, CONFIG_NAME), {
      'config': configs[0] if len(configs) == 1 else {'architecture': 'union', 'configs': configs},
      **({GATE_KEY: 'token'} if gates == {'token'} else {}),
      'hidden_size': config.hidden_size, 'model_class': 'LlamaForCausalLM',
      'model_name': base_model_name_or_path or '', 'model_type': 'llama', 'name': name,
      'version': FORMAT_VERSION})


def _part(method, tree, config, name) -> tuple[dict, dict]:
  """One method's tensors and AdapterHub config."""
  if isinstance(method, PrefixTuning):
    return (adapterhub_prefix_lora.prefix_tensors(method, tree, name, config),
            adapterhub_prefix_lora.prefix_config(method, config))
  if isinstance(method, LoRA):
    return (adapterhub_prefix_lora.lora_tensors(method, tree, name, config),
            adapterhub_prefix_lora.lora_config(method))
  if isinstance(method, Compacter):
    tensors = adapterhub_compacter.hub_tensors(method, tree, name, config)
    fields = adapterhub_compacter.hub_fields(method, config)
  elif isinstance(method, Bottleneck):
    tensors, fields = _bottleneck_tensors(method, tree, config, name)
  else:
    raise AdapterFileError(f'{method.call_string()} is not written as an AdapterHub adapter; '
                           'AdapterHub files hold the bottleneck adapters (Pfeiffer, Houlsby, '
                           'parallel), Compacter, LoRA, prefix tuning, LoReFT and NoReFT; use '
                           'format="aj" or "hf_peft"')
  return tensors, dict(sorted({**BN_CONFIG, **PLACEMENT_CONFIGS[method.placement],
                               'non_linearity': TO_HUB_ACTIVATION[method.activation],
                               'scaling': float(method.scale),
                               'use_gating': bool(getattr(method, 'gate', '')),
                               **fields}.items()))


def _bottleneck_tensors(method, tree, config, name) -> tuple[dict, dict]:
  """A bottleneck's tensors, and its reduction factor as a config field."""
  hidden, dim = config.hidden_size, method.bottleneck_dim(config)
  rf = method.reduction_factor
  if rf is None or int(hidden // rf) != dim:
    rf = reduction_factor(hidden, dim)
  tensors = {}
  for site in method.sites:
    for layer in range(config.num_layers):
      for leaf, hub_name in tensor_names(name, site, layer).items():
        if leaf in tree[site]:
          value = np.asarray(tree[site][leaf][layer], np.float32)
          tensors[hub_name] = value.T if value.ndim == 2 else value  # torch Linear: [out, in]
      if method.gate:  # torch Linear(D, 1): [1, D], [1]
        names = tensor_names(name, site, layer)
        tensors[names['gate']] = np.asarray(tree[site]['gate'][layer], np.float32)[None]
        tensors[names['gate_bias']] = np.asarray(tree[site]['gate_bias'][layer], np.float32)[None]
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


def _bottleneck(raw, settings, path, hidden) -> tuple[Bottleneck | Compacter, list[str]]:
  """The method an AdapterHub bottleneck config describes, and what in it does not fit this
  base."""
  phm = settings.get('phm_layer') is True  # a Compacter
  if phm and settings.get('use_gating'):
    raise AdapterFileError(f'{path}: a gated Compacter (use_gating) is not read here')
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
    method = Bottleneck(dim=int(hidden // rf), gate=hub_gate(settings.get('use_gating'), raw),
                        **common)
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
    method, tree = adapterhub_reft.load(directory, raw, config, allow_pickle, path)
    return (method,), {method.key: tree}
  parts = raw['config'].get('configs') if raw['config'].get('architecture') == 'union' else [
      raw['config']]
  if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
    raise AdapterFileError(f'{path}: a union config without a "configs" list')
  tensors, weights_path = read_tensors(directory, WEIGHTS_NAME, PICKLE_NAME, allow_pickle)
  # saved from a LlamaModel (no LM head), the names lack the "model." of LlamaForCausalLM
  tensors = {(n if n.startswith('model.') else 'model.' + n): t for n, t in tensors.items()}
  methods, peft = [], {}
  for settings in parts:  # in a union, each part checks the tensors under its modules' names
    part = _union_part(tensors, settings.get('architecture')) if len(parts) > 1 else tensors
    method, tree = _load_part(raw, settings, part, weights_path, config, path)
    methods.append(method)
    peft[method.key] = tree
  return tuple(methods), peft


def _union_part(tensors, architecture) -> dict:
  """The tensors of a union's part: a LoRA's and a prefix's by their modules, a bottleneck's
  the rest."""
  def owned(name):
    if architecture in UNION_MODULES:
      return UNION_MODULES[architecture] in name
    return not any(module in name for module in UNION_MODULES.values())
  return {name: tensor for name, tensor in tensors.items() if owned(name)}


def _load_part(raw, settings, tensors, weights_path, config, path):
  """(method, tree) of one config of the file (the whole adapter, or one part of a union)."""
  architecture = settings.get('architecture')
  if architecture in ('prefix_tuning', 'lora'):
    hub = adapterhub_prefix_lora
    if architecture == 'lora':
      method = hub.lora_from_hub(settings, raw, path)
      names = hub.lora_names(method, raw['name'], config)
      shapes = hub.lora_shapes(method, names, config)
    else:
      method = hub.prefix_from_hub(settings, raw, path)
      shapes = hub.prefix_shapes(method, raw['name'], config)
    _raise_if_any(shape_problems(shapes, tensors), weights_path, method)
    if architecture == 'lora':
      return method, hub.lora_tree(method, tensors, raw['name'], config)
    return method, hub.prefix_tree(method, tensors, raw['name'], config, path)
  if architecture not in (None, 'bottleneck'):
    raise AdapterFileError(f'{path}: architecture {architecture!r} is not read here; only '
                           'bottleneck adapters (seq_bn, double_seq_bn, par_bn, Compacter), LoRA, '
                           'prefix tuning, their union, and reft')
  method, problems = _bottleneck(raw, settings, path, config.hidden_size)
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
  if method.gate:
    shapes.update(gate=(1, d), gate_bias=(1,))
  names = {(site, layer): {leaf: name for leaf, name in tensor_names(raw['name'], site, layer).items()
                           if leaf in shapes}
           for site in method.sites for layer in range(config.num_layers)}
  problems += shape_problems({hub: shapes[leaf] for per_adapter in names.values()
                              for leaf, hub in per_adapter.items()}, tensors)
  _raise_if_any(problems, weights_path, method)
  tree = {site: {leaf: np.stack([tensors[names[site, l][leaf]] for l in range(config.num_layers)])
                 for leaf in shapes} for site in method.sites}
  for leaves in tree.values():  # torch Linear [out, in] -> our kernels [in, out]
    leaves['down'], leaves['up'] = leaves['down'].transpose(0, 2, 1), leaves['up'].transpose(0, 2, 1)
    if method.gate:  # [L, 1, D], [L, 1] -> [L, D], [L]
      leaves['gate'], leaves['gate_bias'] = leaves['gate'][:, 0], leaves['gate_bias'][:, 0]
  return method, tree


def _raise_if_any(problems, weights_path, method) -> None:
  if problems:
    raise AdapterFileError(f'{weights_path} does not fit this model ({method.call_string()}): '
                           f'{join_problems(problems)}')
