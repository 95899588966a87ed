"""AdapterFusion in AdapterHub's layout: the fusion layer apart from its adapters, each in its folder.

What `model.save_adapter_setup(dir, Fuse(a, b), use_safetensors=True)` writes for a
`LlamaForCausalLM` (adapters 1.3.0), and `model.load_adapter_setup(dir,
use_safetensors=True)` reads:

    dir/adapter_setup.json         {"adapter_setup": {"type": "Fuse", "children": [{"type":
                                   "single", "children": ["a"]}, ...]}, "head_setup": null, ...}
    dir/a/, dir/b/                 each adapter as `save_adapter` writes it (adapterhub.py)
    dir/a,b/adapter_fusion_config.json   `save_adapter_fusion`'s: "adapter_names", "config"
                                   (AdapterFusionConfig's fields), hidden_size, name, ...
    dir/a,b/model_adapter_fusion.safetensors
        model.layers.{l}.output_adapters.adapter_fusion_layer.{a,b}.query.weight [D, D] = W_qᵀ
        ...query.bias [D], ...key.weight, ...key.bias, ...value.weight (no bias); the same under
        attention_adapters for houlsby

Written: that layout, the adapters named adapter0, adapter1, ... Read: such a setup
folder, or a fusion folder alone (`save_adapter_fusion`'s) whose adapters lie beside it
(`../a`, `../b`, as in a setup folder). AdapterHub saves no temperature: a fusion read with
`temperature` starts at T = 50, as AdapterHub's does when it loads one; `dropout_prob` acts
in training only and is read past. AdapterFusionConfig's fields map to ours:

    query, key, value          projections ('query', 'key', 'value' among them)
    query_before_ln, residual_before, value_before_softmax, value_initialized, temperature,
    regularization             the same names
"""

from __future__ import annotations

import os

from etils import epath
import numpy as np

from additive_jax.peft.files import adapterhub
from additive_jax.peft.files.file_io import (AdapterFileError, join_problems, read_json,
                                             read_tensors, shape_problems, write_json,
                                             write_tensors)
from additive_jax.peft.registry import method_from_fields

SETUP_NAME = 'adapter_setup.json'
CONFIG_NAME = 'adapter_fusion_config.json'
WEIGHTS_NAME = 'model_adapter_fusion.safetensors'
PICKLE_NAME = 'pytorch_model_adapter_fusion.bin'
PROJECTIONS = ('query', 'key', 'value')
FLAGS = ('query_before_ln', 'residual_before', 'value_before_softmax', 'value_initialized',
         'temperature', 'regularization')
INITIAL_TEMPERATURE = 50.0


def holds_fusion(directory: str) -> bool:
  """Whether `directory` is an AdapterHub setup folder or fusion folder."""
  return any((epath.Path(directory) / name).exists() for name in (SETUP_NAME, CONFIG_NAME))


def tensor_name(fusion: str, site: str, layer: int, leaf: str) -> str:
  """AdapterHub's name of our leaf ('query', 'query_bias', ..., 'value')."""
  projection, _, bias = leaf.partition('_')
  return (f'model.layers.{layer}.{adapterhub.SITE_MODULES[site]}.adapter_fusion_layer.{fusion}.'
          f'{projection}.{"bias" if bias else "weight"}')


def save(directory, method, tree, config, base_model_name_or_path=None) -> None:
  """Writes the fusion `method` (its leaves `tree`) as an AdapterHub setup folder."""
  names = [f'adapter{n}' for n in range(len(method.fused))]
  fusion = ','.join(names)
  for n, (name, adapter) in enumerate(zip(names, method.fused)):
    (epath.Path(directory) / name).mkdir(parents=True, exist_ok=True)
    adapterhub.save(os.path.join(directory, name), (adapter,), {adapter.key: tree['adapters'][str(n)]},
                    config, base_model_name_or_path, name=name)
  (epath.Path(directory) / fusion).mkdir(parents=True, exist_ok=True)
  tensors = {tensor_name(fusion, site, layer, leaf): _torch_layout(leaf, value[layer])
             for site in method.sites for leaf, value in tree[site].items()
             for layer in range(config.num_layers)}
  write_tensors(os.path.join(directory, fusion, WEIGHTS_NAME), tensors, {'format': 'pt'})
  settings = {**{p: p in method.projections for p in PROJECTIONS},
              **{flag: getattr(method, flag) for flag in FLAGS}, 'dropout_prob': None}
  write_json(os.path.join(directory, fusion, CONFIG_NAME), {
      'adapter_names': names, 'config': dict(sorted(settings.items())),
      'hidden_size': config.hidden_size, 'model_class': 'LlamaForCausalLM',
      'model_name': base_model_name_or_path or '', 'model_type': 'llama', 'name': fusion,
      'version': adapterhub.FORMAT_VERSION})
  write_json(os.path.join(directory, SETUP_NAME), {
      'adapter_setup': {'type': 'Fuse', 'children': [{'type': 'single', 'children': [name]}
                                                     for name in names]},
      'head_setup': None, 'version': adapterhub.FORMAT_VERSION})


def _torch_layout(leaf: str, value) -> np.ndarray:
  """A torch Linear's weight is [out, in]: our kernels [in, out] transposed."""
  value = np.asarray(value, np.float32)
  return value.T if value.ndim == 2 else value


def load(directory, config, allow_pickle=False):
  """(Fusion, tree) from an AdapterHub setup folder or fusion folder."""
  fusion_dir, adapter_dirs = _folders(directory)
  path = os.path.join(fusion_dir, CONFIG_NAME)
  raw = read_json(path)
  settings = raw.get('config')
  if not isinstance(settings, dict) or not isinstance(raw.get('name'), str):
    raise AdapterFileError(f'{path}: not an AdapterHub fusion config (no "config" object and '
                           '"name")')
  if raw.get('hidden_size', config.hidden_size) != config.hidden_size:
    raise AdapterFileError(f'{path}: the fusion was saved for hidden_size={raw["hidden_size"]} '
                           f'(this model: {config.hidden_size})')
  adapters, trees = [], {}
  for n, adapter_dir in enumerate(adapter_dirs):
    methods, peft = adapterhub.load(adapter_dir, config, allow_pickle)
    if len(methods) != 1:
      raise AdapterFileError(f'{adapter_dir} holds {", ".join(m.call_string() for m in methods)}: '
                             'a fused adapter is one bottleneck adapter')
    adapters.append(methods[0])
    trees[str(n)] = peft[methods[0].key]
  method = _method(settings, adapter_dirs, adapters, path)
  try:
    method.check(config)
  except ValueError as err:
    raise AdapterFileError(f'{directory}: {err}') from None
  tensors, weights_path = read_tensors(fusion_dir, WEIGHTS_NAME, PICKLE_NAME, allow_pickle)
  d, fusion = config.hidden_size, raw['name']
  names = {(site, layer, leaf): tensor_name(fusion, site, layer, leaf)
           for site in method.sites for layer in range(config.num_layers)
           for leaf in _leaves(method)}
  problems = shape_problems({hub: (d, d) if leaf in PROJECTIONS else (d,)
                             for (_, _, leaf), hub in names.items()}, tensors)
  if problems:
    raise AdapterFileError(f'{weights_path} does not fit this model ({method.call_string()}): '
                           f'{join_problems(problems)}')
  tree = {'adapters': trees}
  for site in method.sites:
    tree[site] = {leaf: np.stack([_torch_layout(leaf, tensors[names[site, layer, leaf]])
                                  for layer in range(config.num_layers)])
                  for leaf in _leaves(method)}
  if method.temperature:
    tree['temperature'] = np.asarray(INITIAL_TEMPERATURE, np.float32)
  return (method,), {method.key: tree}


def _leaves(method) -> list[str]:
  return [leaf for p in method.projections for leaf in ((p,) if p == 'value' else (p, f'{p}_bias'))]


def _folders(directory) -> tuple[str, list[str]]:
  """(the fusion folder, its adapters' folders) of a setup folder or a fusion folder."""
  setup_path = os.path.join(directory, SETUP_NAME)
  if not epath.Path(setup_path).exists():  # a fusion folder alone: its adapters beside it
    names = read_json(os.path.join(directory, CONFIG_NAME)).get('adapter_names')
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
      raise AdapterFileError(f'{os.path.join(directory, CONFIG_NAME)}: "adapter_names" must be '
                             'a list of the fused adapters\' names')
    parent = os.path.dirname(os.path.normpath(directory))
    missing = [n for n in names if not epath.Path(parent, n).is_dir()]
    if missing:
      raise AdapterFileError(f'{directory} holds an AdapterHub fusion layer alone; its adapters '
                             f'{", ".join(missing)} are not beside it ({parent}): load the '
                             'folder save_adapter_setup wrote')
    return str(directory), [os.path.join(parent, n) for n in names]
  setup = read_json(setup_path).get('adapter_setup')
  children = setup.get('children') if isinstance(setup, dict) else None
  if not (isinstance(setup, dict) and setup.get('type') == 'Fuse' and isinstance(children, list)
          and all(isinstance(c, dict) and c.get('type') == 'single' for c in children)):
    raise AdapterFileError(f'{setup_path}: only a Fuse of single adapters is read here, got '
                           f'{setup!r:.120}')
  names = [c['children'][0] for c in children]
  name = (setup.get('kwargs') or {}).get('name') or ','.join(names)
  return os.path.join(directory, name), [os.path.join(directory, n) for n in names]


def _method(settings, adapter_dirs, adapters, path):
  """Our Fusion of AdapterHub's fusion config."""
  unknown = sorted(set(settings) - set(PROJECTIONS) - set(FLAGS) - {'dropout_prob'})
  if unknown:
    raise AdapterFileError(f'{path}: unknown fusion config fields {unknown}')
  fields = {flag: settings[flag] for flag in FLAGS if flag in settings}
  if 'value_initialized' in fields:  # AdapterHub types it as a str, and writes a bool
    fields['value_initialized'] = fields['value_initialized'] in (True, 'True', 'true')
  try:
    return method_from_fields('fusion', {
        'adapters': tuple(adapter_dirs),
        'adapter_methods': tuple(m.call_string() for m in adapters),
        'projections': tuple(p for p in PROJECTIONS if settings.get(p, True)), **fields})
  except ValueError as err:
    raise AdapterFileError(f'{path}: {err}') from None
