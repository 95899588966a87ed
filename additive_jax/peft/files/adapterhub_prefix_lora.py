"""AdapterHub's LoRA and prefix tuning, their gates, in its adapter files (adapters 1.3.0).

Alone or in a `ConfigUnion` (MAM: prefix tuning + par_bn; UniPELT: gated prefix
tuning + seq_bn + LoRA; adapterhub.py assembles the union), per adapter `name`:

LoRA (`LoRAConfig`): per layer l and target t, with `loras.{name}.` under
  model.layers.{l}.self_attn.{q,k,v}_proj   (`attn_matrices`, with selfattn_lora)
  model.layers.{l}.mlp.down_proj            (`intermediate_lora`: AdapterHub wraps down_proj
  model.layers.{l}.mlp.up_proj              as "intermediate" and up_proj as "output")
the tensors lora_A [r, I] = a[l]ᵀ, lora_B [O, r] = b[l]ᵀ, and with `use_gating`
gate.weight [1, I], gate.bias [1]. LoRA on o_proj or gate_proj cannot be said.

Prefix tuning (`PrefixTuningConfig`), once for the model, under
model.prefix_tuning.prefix_tunings.{name}.self_prefix.:
  wte.weight [n, D]                           = embedding_PD
  control_trans.0.weight [R, D], .0.bias [R]  = in_DRᵀ, in_bias_R
  control_trans.2.weight [L·2·K·H, R], .2.bias: the output viewed [L·2, K, H], layer l's
                                                key at 2l, its value at 2l + 1
or, with `flat: true`, control_trans [n·L·2·K·H] viewed [n, L·2, K, H] (k_LPKH, v_LPKH);
with `use_gating`, per layer model.layers.{l}.self_attn.prefix_tuning.prefix_gates.{name}.weight
[1, D] and .bias [1] (`shared_gating`: one gate for keys and values). AdapterHub's prefix is
PrefixTuning(embedding_width='hidden', positions='from_zero') with the model's head dim
(AdapterHub takes hidden/heads, methods/prefix_tuning.py:369: we refuse to write a model
whose head dim differs, as AdapterHub would build another shape).

Every prefix tensor is also in AdapterHub's state dict once per layer, under
model.layers.{l}.self_attn.prefix_tuning.pool.prefix_tunings.{name}.… — the same tensor
(the pool is shared). Because of that, `save_adapter(..., use_safetensors=True)` fails on
any prefix adapter (safetensors refuses shared tensors; adapters loading.py:96), and its
pickle is not read here. We write each tensor once; AdapterHub loads such a file, listing
the per-layer aliases as missing keys though they are the same tensors. Reading accepts
the aliases where a converted file has them, if equal to the tensor they alias.

Gates: AdapterHub's `use_gating` is our gate='sequence' (peft/gate.py). A gate='token'
method is written with use_gating true and "additive_jax_gate": "token" beside the
config, so it reads back as written; AdapterHub itself reads it as its sequence mean.
"""

from __future__ import annotations

import numpy as np

from additive_jax.peft.files.file_io import AdapterFileError
from additive_jax.peft.lora import LoRA, widths
from additive_jax.peft.prefix import PrefixTuning

LORA_CONFIG = {'alpha': 8, 'architecture': 'lora', 'attn_matrices': ['q', 'v'],
               'composition_mode': 'add', 'dropout': 0.0, 'dtype': None, 'init_weights': 'lora',
               'init_weights_seed': None, 'intermediate_lora': False, 'leave_out': [],
               'output_lora': False, 'r': 8, 'selfattn_lora': True, 'use_dora': False,
               'use_gating': False, 'vera_b': None, 'vera_d': None}
PREFIX_CONFIG = {'architecture': 'prefix_tuning', 'bottleneck_size': 512, 'cross_prefix': True,
                 'dropout': 0.0, 'encoder_prefix': True, 'flat': False, 'init_weights_seed': None,
                 'leave_out': [], 'non_linearity': 'tanh', 'prefix_length': 30,
                 'shared_gating': True, 'use_gating': False}
ATTENTION = ('q', 'k', 'v')
MLP_FLAGS = {'down': 'intermediate_lora', 'up': 'output_lora'}
GATE_KEY = 'additive_jax_gate'  # beside "config": our gate where AdapterHub's cannot say it


def hub_gate(gate: str, raw: dict) -> str:
  """Our gate for AdapterHub's `use_gating` (and our note beside the config)."""
  return raw.get(GATE_KEY, 'sequence') if gate else ''


# --- LoRA ---------------------------------------------------------------------------------

def lora_config(method: LoRA) -> dict:
  unsaid = [t for t in method.targets if t not in ATTENTION + tuple(MLP_FLAGS)]
  if unsaid:
    raise AdapterFileError(f'{method.call_string()}: AdapterHub\'s LoRA acts on q, k, v, up and '
                           f'down projections only, not {unsaid}')
  if not float(method.alpha).is_integer():
    raise AdapterFileError(f'{method.call_string()}: AdapterHub\'s LoRA alpha is an integer')
  attention = [t for t in ATTENTION if t in method.targets]
  return {**LORA_CONFIG, 'r': method.rank, 'alpha': int(method.alpha),
          'attn_matrices': attention or ['q', 'v'], 'selfattn_lora': bool(attention),
          **{flag: target in method.targets for target, flag in MLP_FLAGS.items()},
          'use_gating': bool(method.gate)}


def lora_from_hub(settings: dict, raw: dict, path: str) -> LoRA:
  fixed = {'composition_mode': 'add', 'use_dora': False, 'vera_b': None, 'vera_d': None}
  changed = [f'{k}={settings.get(k)!r}' for k, v in fixed.items() if settings.get(k, v) != v]
  if settings.get('leave_out'):
    changed.append(f'leave_out={settings["leave_out"]!r}')
  if changed:
    raise AdapterFileError(f'{path}: LoRA with {", ".join(changed)} is not read here')
  targets = [t for t in ATTENTION if settings.get('selfattn_lora', True)
             and t in settings.get('attn_matrices', ['q', 'v'])]
  targets += [t for t, flag in MLP_FLAGS.items() if settings.get(flag)]
  try:
    return LoRA(rank=settings['r'], alpha=settings.get('alpha', 8), targets=tuple(targets),
                gate=hub_gate(settings.get('use_gating'), raw))
  except (KeyError, ValueError) as err:
    raise AdapterFileError(f'{path}: LoRA {err}') from None


def lora_names(method: LoRA, name: str, config) -> dict:
  """(target, leaf, layer) -> AdapterHub's tensor name."""
  names = {}
  for t in method.targets:
    module = 'self_attn' if t in ATTENTION else 'mlp'
    for layer in range(config.num_layers):
      base = f'model.layers.{layer}.{module}.{t}_proj.loras.{name}.'
      names[t, 'a', layer], names[t, 'b', layer] = base + 'lora_A', base + 'lora_B'
      if method.gate:
        names[t, 'gate', layer] = base + 'gate.weight'
        names[t, 'gate_bias', layer] = base + 'gate.bias'
  return names


def lora_shapes(method: LoRA, names: dict, config) -> dict:
  shapes = {}
  for (t, leaf, _), hub in names.items():
    i, o = widths(config, t)
    shapes[hub] = {'a': (method.rank, i), 'b': (o, method.rank), 'gate': (1, i),
                   'gate_bias': (1,)}[leaf]
  return shapes


def lora_tensors(method: LoRA, tree, name: str, config) -> dict:
  out = {}
  for (t, leaf, layer), hub in lora_names(method, name, config).items():
    value = np.asarray(tree[t][leaf][layer], np.float32)
    out[hub] = value.T if leaf in ('a', 'b') else value.reshape(-1 if leaf == 'gate_bias' else
                                                                (1, -1))
  return out


def lora_tree(method: LoRA, tensors: dict, name: str, config) -> dict:
  names, tree = lora_names(method, name, config), {}
  for t in method.targets:
    leaves = ('a', 'b') + (('gate', 'gate_bias') if method.gate else ())
    tree[t] = {leaf: np.stack([tensors[names[t, leaf, l]] for l in range(config.num_layers)])
               for leaf in leaves}
    tree[t]['a'], tree[t]['b'] = tree[t]['a'].transpose(0, 2, 1), tree[t]['b'].transpose(0, 2, 1)
    if method.gate:
      tree[t]['gate'] = tree[t]['gate'][:, 0]
      tree[t]['gate_bias'] = tree[t]['gate_bias'][:, 0]
  return tree


# --- prefix tuning ------------------------------------------------------------------------

def prefix_config(method: PrefixTuning, config) -> dict:
  problems = []
  if method.positions != 'from_zero':
    problems.append("AdapterHub's real tokens keep positions 0…T−1: positions='from_zero'")
  if method.projection_dim is not None and method.embedding_width != 'hidden':
    problems.append("AdapterHub's prefix MLP reads [n, D]: embedding_width='hidden'")
  if config.hidden_size != config.num_heads * config.head_dim:
    problems.append(f'AdapterHub takes the head dim as hidden/heads = '
                    f'{config.hidden_size / config.num_heads:g}, this model\'s is {config.head_dim} '
                    '(adapters methods/prefix_tuning.py:369)')
  if problems:
    raise AdapterFileError(f'{method.call_string()} cannot be an AdapterHub prefix: '
                           + '; '.join(problems))
  return {**PREFIX_CONFIG, 'prefix_length': method.num_tokens,
          'flat': method.projection_dim is None,
          'bottleneck_size': method.projection_dim or PREFIX_CONFIG['bottleneck_size'],
          'use_gating': bool(method.gate)}


def prefix_from_hub(settings: dict, raw: dict, path: str) -> PrefixTuning:
  changed = [f'{k}={settings.get(k)!r}' for k, v in (('non_linearity', 'tanh'),
                                                      ('shared_gating', True))
             if str(settings.get(k, v)).lower() != str(v).lower()]
  if settings.get('leave_out'):
    changed.append(f'leave_out={settings["leave_out"]!r}')
  if changed:
    raise AdapterFileError(f'{path}: prefix tuning with {", ".join(changed)} is not read here')
  flat = settings.get('flat', False)
  try:
    return PrefixTuning(settings['prefix_length'],
                        None if flat else settings.get('bottleneck_size', 512),
                        embedding_width='kv' if flat else 'hidden', positions='from_zero',
                        gate=hub_gate(settings.get('use_gating'), raw))
  except (KeyError, ValueError) as err:
    raise AdapterFileError(f'{path}: prefix tuning {err}') from None


def prefix_shapes(method: PrefixTuning, name: str, config) -> dict:
  """AdapterHub's tensor name -> shape, the canonical names and the gates."""
  n, d, r = method.num_tokens, config.hidden_size, method.projection_dim
  out = config.num_layers * 2 * config.num_kv_heads * config.head_dim
  base = f'model.prefix_tuning.prefix_tunings.{name}.self_prefix.'
  shapes = ({base + 'control_trans': (n * out,)} if r is None else
            {base + 'wte.weight': (n, d), base + 'control_trans.0.weight': (r, d),
             base + 'control_trans.0.bias': (r,), base + 'control_trans.2.weight': (out, r),
             base + 'control_trans.2.bias': (out,)})
  if method.gate:
    for layer in range(config.num_layers):
      gate = f'model.layers.{layer}.self_attn.prefix_tuning.prefix_gates.{name}.'
      shapes[gate + 'weight'], shapes[gate + 'bias'] = (1, d), (1,)
  return shapes


def prefix_tensors(method: PrefixTuning, tree, name: str, config) -> dict:
  layers, k, h = config.num_layers, config.num_kv_heads, config.head_dim
  base = f'model.prefix_tuning.prefix_tunings.{name}.self_prefix.'
  leaves = {key: np.asarray(value, np.float32) for key, value in tree.items()}
  if method.projection_dim is None:  # [L, n, K, H] ×2 -> [n, L, 2, K, H]
    kv = np.stack([leaves['k_LPKH'], leaves['v_LPKH']], axis=2).transpose(1, 0, 2, 3, 4)
    out = {base + 'control_trans': kv.reshape(-1)}
  else:
    r = method.projection_dim
    w_L2KHR = np.stack([leaves['out_k_LRKH'], leaves['out_v_LRKH']], 1).transpose(0, 1, 3, 4, 2)
    b_L2KH = np.stack([leaves['out_k_bias_LKH'], leaves['out_v_bias_LKH']], 1)
    out = {base + 'wte.weight': leaves['embedding_PD'], base + 'control_trans.0.weight':
           leaves['in_DR'].T, base + 'control_trans.0.bias': leaves['in_bias_R'],
           base + 'control_trans.2.weight': w_L2KHR.reshape(layers * 2 * k * h, r),
           base + 'control_trans.2.bias': b_L2KH.reshape(-1)}
  if method.gate:
    for layer in range(layers):
      gate = f'model.layers.{layer}.self_attn.prefix_tuning.prefix_gates.{name}.'
      out[gate + 'weight'] = leaves['gate'][layer][None]
      out[gate + 'bias'] = leaves['gate_bias'][layer][None]
  return out


def prefix_tree(method: PrefixTuning, tensors: dict, name: str, config, path: str) -> dict:
  layers, k, h = config.num_layers, config.num_kv_heads, config.head_dim
  base = f'model.prefix_tuning.prefix_tunings.{name}.self_prefix.'
  for alias in [n for n in tensors if '.prefix_tuning.pool.prefix_tunings.' in n]:
    canonical = base + alias.split(f'.prefix_tunings.{name}.self_prefix.', 1)[-1]
    if canonical in tensors and not np.array_equal(tensors[alias], tensors[canonical]):
      raise AdapterFileError(f'{path}: {alias} differs from {canonical}, the tensor it aliases')
  if method.projection_dim is None:
    kv = tensors[base + 'control_trans'].reshape(method.num_tokens, layers, 2, k, h)
    tree = {'k_LPKH': kv[:, :, 0].transpose(1, 0, 2, 3), 'v_LPKH': kv[:, :, 1].transpose(1, 0, 2, 3)}
  else:
    r = method.projection_dim
    w_L2KHR = tensors[base + 'control_trans.2.weight'].reshape(layers, 2, k, h, r)
    b_L2KH = tensors[base + 'control_trans.2.bias'].reshape(layers, 2, k, h)
    tree = {'embedding_PD': tensors[base + 'wte.weight'],
            'in_DR': tensors[base + 'control_trans.0.weight'].T,
            'in_bias_R': tensors[base + 'control_trans.0.bias'],
            'out_k_LRKH': w_L2KHR[:, 0].transpose(0, 3, 1, 2),
            'out_v_LRKH': w_L2KHR[:, 1].transpose(0, 3, 1, 2),
            'out_k_bias_LKH': b_L2KH[:, 0], 'out_v_bias_LKH': b_L2KH[:, 1]}
  if method.gate:
    gates = [f'model.layers.{l}.self_attn.prefix_tuning.prefix_gates.{name}.' for l in range(layers)]
    tree['gate'] = np.stack([tensors[g + 'weight'][0] for g in gates])
    tree['gate_bias'] = np.stack([tensors[g + 'bias'][0] for g in gates])
  return {key: np.ascontiguousarray(value, np.float32) for key, value in tree.items()}
