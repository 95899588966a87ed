"""Hugging Face `LlamaForCausalLM` tensor names and layouts <-> our params tree.

HF stores a linear layer as `weight [out, in]`; our kernels are `[in, out]` with
the head axes split out (q: [D, N, H], o: [N, H, D]) and every per-layer weight
stacked on a leading `layers` axis (the blocks are scanned).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from additive_jax.model.config import LlamaConfig
from additive_jax.model.quant import QuantizedWeight, stack
from additive_jax.model.quant_layout import Layout, blocks_to_ours, quantize_weight


class ModelLoadError(ValueError):
  """A checkpoint that does not hold the weights its config describes."""


def _layer_tensors(cfg: LlamaConfig):
  """(our path, HF name suffix, HF shape, HF -> ours) for one layer's weights."""
  d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  rows = [
      (('input_layernorm', 'scale'), 'input_layernorm.weight', (d,), lambda w: w),
      (('post_attention_layernorm', 'scale'), 'post_attention_layernorm.weight', (d,), lambda w: w),
      (('self_attn', 'q_proj', 'kernel'), 'self_attn.q_proj.weight', (n * h, d),
       lambda w: w.T.reshape(d, n, h)),
      (('self_attn', 'k_proj', 'kernel'), 'self_attn.k_proj.weight', (k * h, d),
       lambda w: w.T.reshape(d, k, h)),
      (('self_attn', 'v_proj', 'kernel'), 'self_attn.v_proj.weight', (k * h, d),
       lambda w: w.T.reshape(d, k, h)),
      (('self_attn', 'o_proj', 'kernel'), 'self_attn.o_proj.weight', (d, n * h),
       lambda w: w.T.reshape(n, h, d)),
      (('mlp', 'gate_proj', 'kernel'), 'mlp.gate_proj.weight', (f, d), lambda w: w.T),
      (('mlp', 'up_proj', 'kernel'), 'mlp.up_proj.weight', (f, d), lambda w: w.T),
      (('mlp', 'down_proj', 'kernel'), 'mlp.down_proj.weight', (d, f), lambda w: w.T),
  ]
  if cfg.attention_bias:
    rows += [
        (('self_attn', 'q_proj', 'bias'), 'self_attn.q_proj.bias', (n * h,), lambda b: b.reshape(n, h)),
        (('self_attn', 'k_proj', 'bias'), 'self_attn.k_proj.bias', (k * h,), lambda b: b.reshape(k, h)),
        (('self_attn', 'v_proj', 'bias'), 'self_attn.v_proj.bias', (k * h,), lambda b: b.reshape(k, h)),
        (('self_attn', 'o_proj', 'bias'), 'self_attn.o_proj.bias', (d,), lambda b: b),
    ]
  if cfg.mlp_bias:
    rows += [(('mlp', name, 'bias'), f'mlp.{name}.bias', (size,), lambda b: b)
             for name, size in (('gate_proj', f), ('up_proj', f), ('down_proj', d))]
  return rows


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a `LlamaForCausalLM` checkpoint of this config holds, with its shape."""
  shapes = {'model.embed_tokens.weight': (cfg.vocab_size, cfg.hidden_size),
            'model.norm.weight': (cfg.hidden_size,)}
  if not cfg.tie_word_embeddings:
    shapes['lm_head.weight'] = (cfg.vocab_size, cfg.hidden_size)
  for i in range(cfg.num_layers):
    for _, suffix, shape, _ in _layer_tensors(cfg):
      shapes[f'model.layers.{i}.{suffix}'] = shape
  return shapes


def our_path(cfg: LlamaConfig, name: str) -> tuple[str, ...] | None:
  """The path in our params of the weight an HF tensor name holds (a layer's weights share
  one), or None."""
  paths = {'model.embed_tokens.weight': ('embed_tokens', 'embedding'),
           'model.norm.weight': ('norm', 'scale'), 'lm_head.weight': ('lm_head', 'kernel')}
  if name.startswith('model.layers.') and name.count('.') >= 3:
    suffix = name.split('.', 3)[3]
    paths = {f'model.layers.{name.split(".")[2]}.{s}': ('layers', *path)
             for path, s, _, _ in _layer_tensors(cfg) if s == suffix}
  return paths.get(name)


def params_from_hf(cfg: LlamaConfig, read: Callable[[str], np.ndarray], source: str,
                   layout: Layout | None = None) -> dict:
  """Builds our params tree from HF-named tensors; `read(name)` returns one as numpy, or as a
  GGUF tensor's blocks (a `QuantizedWeight` in the HF layout, kept as they are). With `layout`
  (model/quant_layout.py) its weights are quantized one tensor at a time as they are read.

  Every tensor is checked against the config before it is used, and a bad one is
  named with `source`; nothing is returned half-built.
  """
  expected = hf_tensor_shapes(cfg)
  dtype = np.dtype(cfg.param_dtype)

  def get(name):
    try:
      tensor = read(name)
    except KeyError:
      raise ModelLoadError(f'{source}: tensor {name!r} is missing') from None
    if tuple(tensor.shape) != expected[name]:
      raise ModelLoadError(f'{source}: tensor {name!r} has shape {tuple(tensor.shape)}, '
                            f'the config implies {expected[name]}')
    if isinstance(tensor, QuantizedWeight):
      return tensor
    return np.asarray(tensor).astype(dtype)

  def ours(path, name, to_ours):
    value = get(name)
    if isinstance(value, QuantizedWeight):  # its blocks move with their rows (quant_layout.py)
      return blocks_to_ours(value, path, to_ours(np.broadcast_to(np.float32(0), value.shape)).shape)
    return quantize_weight(layout, path, to_ours(value))

  params: dict = {'embed_tokens': {'embedding': ours(('embed_tokens', 'embedding'),
                                                     'model.embed_tokens.weight', lambda w: w)},
                  'norm': {'scale': get('model.norm.weight')}, 'layers': {}}
  if not cfg.tie_word_embeddings:
    params['lm_head'] = {'kernel': ours(('lm_head', 'kernel'), 'lm_head.weight', lambda w: w.T)}
  for path, suffix, _, to_ours in _layer_tensors(cfg):
    stacked = stack([ours(('layers', *path), f'model.layers.{i}.{suffix}', to_ours)
                     for i in range(cfg.num_layers)])
    node = params['layers']
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = stacked
  return params


def params_to_hf(cfg: LlamaConfig, params) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf`: HF names and layouts (for a merged export)."""
  out = {'model.embed_tokens.weight': np.asarray(params['embed_tokens']['embedding']),
         'model.norm.weight': np.asarray(params['norm']['scale'])}
  if not cfg.tie_word_embeddings:
    out['lm_head.weight'] = np.asarray(params['lm_head']['kernel']).T
  for path, suffix, shape, _ in _layer_tensors(cfg):
    node = params['layers']
    for key in path:
      node = node[key]
    stacked = np.asarray(node)
    for i in range(cfg.num_layers):
      ours = stacked[i]
      hf = ours.reshape(shape[1], shape[0]).T if len(shape) == 2 else ours.reshape(shape)
      out[f'model.layers.{i}.{suffix}'] = np.ascontiguousarray(hf)
  return out


def config_to_hf(cfg: LlamaConfig) -> dict:
  """The inverse of `LlamaConfig.from_hf`: a `config.json` dict for `LlamaForCausalLM`.

  Written in the transformers 4 form (`rope_theta`, `rope_scaling`), which
  transformers 4 and 5 both read.
  """
  hf = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
        'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
        'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
        'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
        'head_dim': cfg.head_dim, 'rope_theta': cfg.rope_theta, 'rms_norm_eps': cfg.rms_norm_eps,
        'tie_word_embeddings': cfg.tie_word_embeddings, 'attention_bias': cfg.attention_bias,
        'mlp_bias': cfg.mlp_bias, 'max_position_embeddings': cfg.max_position_embeddings,
        'torch_dtype': np.dtype(cfg.param_dtype).name}
  scaling = cfg.rope_scaling
  if scaling.rope_type == 'linear':
    hf['rope_scaling'] = {'rope_type': 'linear', 'factor': scaling.factor}
  elif scaling.rope_type == 'llama3':
    hf['rope_scaling'] = {'rope_type': 'llama3', 'factor': scaling.factor,
                          'low_freq_factor': scaling.low_freq_factor,
                          'high_freq_factor': scaling.high_freq_factor,
                          'original_max_position_embeddings':
                              scaling.original_max_position_embeddings}
  return hf
