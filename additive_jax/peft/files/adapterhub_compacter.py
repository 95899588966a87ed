"""AdapterHub Compacter files: a bottleneck config with `phm_layer: true` (adapterhub.py reads
and writes the rest of the file and calls this for what is Compacter's own).

`CompacterConfig` is `double_seq_bn`, `CompacterPlusPlusConfig` is `seq_bn` with
`phm_layer: true`; the placement, activation, scaling and reduction factor are read as for a
bottleneck, and the PHM fields map one to one onto `Compacter`'s: phm_dim, phm_rank,
shared_phm_rule, factorized_phm_rule, factorized_phm_W, shared_W_phm, phm_bias. Reading
accepts any value of the fields that only draw the initial weights (phm_c_init,
phm_init_range, hypercomplex_nonlinearity, init_weights) and refuses learn_phm=false (rules
that do not train are not kept apart here). A parallel Compacter is written with
init_weights "bert": AdapterHub's par_bn default, "mam_adapter", fails on a PHM layer
(it initializes `layer.weight`, which a PHMLayer does not have).

Tensors, per layer l, site module m (output_adapters; attention_adapters too for houlsby)
and projection (adapter_down.0: D → R, adapter_up: R → D), under the adapter's name:

  model.layers.{l}.{m}.adapters.{name}.adapter_down.0.W_left [n, D/n, k]   ours: {m}/down/w_left[l]
  ...W_right [n, k, R/n], ...W [n, D/n, R/n] (unfactorized), ...b [R] (bias)
  ...phm_rule [n, n, n], ...phm_rule_left [n, n, 1], ...phm_rule_right [n, 1, n] (rule not shared)

and once for the adapter, `model.shared_parameters.{name}.`: phm_rule (or phm_rule_left,
phm_rule_right) with shared_phm_rule, W_down_left, W_down_right, W_up_left, W_up_right with
shared_W_phm (ours: shared/rule, shared/down/w_left, ...). Every tensor is our leaf in its
own layout: nothing is transposed.
"""

from __future__ import annotations

import numbers

import numpy as np
from flax import traverse_util

from additive_jax.peft.compacter import Compacter
from additive_jax.peft.files.file_io import AdapterFileError
from additive_jax.peft.param_count import leaf_shapes

PHM_FIELDS = ('phm_dim', 'phm_rank', 'shared_phm_rule', 'factorized_phm_rule', 'factorized_phm_W',
              'shared_W_phm', 'phm_bias')
SITE_MODULES = {'attn': 'attention_adapters', 'mlp': 'output_adapters'}
PROJECTION_MODULES = {'down': 'adapter_down.0', 'up': 'adapter_up'}
LEAF_NAMES = {'w_left': 'W_left', 'w_right': 'W_right', 'w': 'W', 'bias': 'b',
              'rule': 'phm_rule', 'rule_left': 'phm_rule_left', 'rule_right': 'phm_rule_right'}


def file_reduction_factor(method: Compacter, config) -> float | int:
  """The reduction factor to write: the method's (an int if whole). A shared W needs an int:
  AdapterHub sizes it from in_features // reduction_factor, a float for a float factor."""
  rf, hidden, dim = method.reduction_factor, config.hidden_size, method.bottleneck_dim(config)
  if float(rf).is_integer():
    return int(rf)
  if not method.shared_W_phm:
    return rf
  whole = hidden // dim
  if int(hidden // whole) != dim:
    raise AdapterFileError(f'{method.call_string()}: AdapterHub sizes a shared W with an integer '
                           f'reduction_factor, and none gives the bottleneck {dim} of {hidden}')
  return whole


def hub_fields(method: Compacter, config) -> dict:
  """The config fields that make the bottleneck config a Compacter."""
  fields = {'phm_layer': True, 'reduction_factor': file_reduction_factor(method, config),
            **{name: getattr(method, name) for name in PHM_FIELDS}}
  if method.placement == 'parallel':
    fields['init_weights'] = 'bert'
  return fields


def method_from_hub(settings: dict, defaults: dict, path: str, **common) -> Compacter:
  """The Compacter of an AdapterHub config; `common` holds what is read as for a bottleneck
  (placement, activation, scale, reduction_factor)."""
  if settings.get('learn_phm', True) is not True:
    raise AdapterFileError(f'{path}: learn_phm={settings["learn_phm"]!r} (needs True): rules that '
                           'do not train are not kept apart here')
  fields = {name: settings.get(name, defaults[name]) for name in PHM_FIELDS}
  for name in ('phm_dim', 'phm_rank'):  # AdapterHub sizes tensors with them: whole numbers
    value = fields[name]
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == int(value):
      fields[name] = int(value)
  try:
    return Compacter(**fields, **common)
  except ValueError as err:
    raise AdapterFileError(f'{path}: {err}') from None


def hub_names(method: Compacter, name: str, config) -> dict[str, tuple[str, int | None, tuple]]:
  """AdapterHub's tensor name -> (our leaf's path, its layer or None if shared, its shape)."""
  names = {}
  for path, shape in leaf_shapes((method,), config).items():
    part, *inner = path.split('/')[1:]  # past the method's key
    if part == 'shared':
      hub = (f'W_{inner[0]}_{inner[1][2:]}' if len(inner) == 2  # w_left -> W_down_left
             else LEAF_NAMES[inner[0]])
      names[f'model.shared_parameters.{name}.{hub}'] = (path, None, shape)
      continue
    projection, leaf = inner
    for layer in range(config.num_layers):
      hub = (f'model.layers.{layer}.{SITE_MODULES[part]}.adapters.{name}.'
             f'{PROJECTION_MODULES[projection]}.{LEAF_NAMES[leaf]}')
      names[hub] = (path, layer, shape[1:])
  return names


def hub_tensors(method: Compacter, tree, name: str, config) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict({method.key: tree}, sep='/')
  return {hub: np.asarray(flat[path] if layer is None else flat[path][layer], np.float32)
          for hub, (path, layer, _) in hub_names(method, name, config).items()}


def tree_from_hub(names, tensors: dict[str, np.ndarray]):
  """Our tree (the method's subtree) from AdapterHub's tensors, `names` from `hub_names`."""
  layers: dict[str, dict[int, np.ndarray]] = {}
  flat = {}
  for hub, (path, layer, _) in names.items():
    if layer is None:
      flat[path] = tensors[hub]
    else:
      layers.setdefault(path, {})[layer] = tensors[hub]
  for path, by_layer in layers.items():
    flat[path] = np.stack([by_layer[layer] for layer in range(len(by_layer))])
  tree = traverse_util.unflatten_dict(flat, sep='/')
  (only,) = tree.values()
  return only
