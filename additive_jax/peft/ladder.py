"""Ladder side tuning (LST): a narrow side network beside the frozen backbone.

The backbone runs under `stop_gradient`. A side network of width R = D/r (r the
reduction) reads the backbone's hidden states through down-projections and
learned gates; its output is up-projected and added to the backbone's final
hidden state before the LM head. No backward pass enters the backbone: the only
backbone tensors the backward keeps are the embeddings and every layer's output,
(L+1)·B·T·D, which feed the down-projections; none of the attention or MLP
internals.

    s_0 = W_e e                                              e: the embedding output
    s_l = Block'_l(μ_l · W_l h_l + (1 − μ_l) · s_{l−1}),      h_l: backbone layer l's output
    μ_l = sigmoid(α_l / T),  T = 0.1,  α_l = 0 at init (μ_l = ½)
    y   = h_final + W_up RMSNorm'(s_L)                        h_final: after the final norm

W_up is zero-initialized, so at init the logits equal the base model's exactly
(the paper replaces the output with the side network's; adding it keeps the
identity at init). Block'_l is the model's own `Block` on a side `LlamaConfig`
(hidden D/r, intermediate F/r, the same N query and K KV heads with head dim
H/r), initialized from backbone block l pruned to that width:

* hidden channels: the R channels with the largest L1 norm of their rows and
  columns in every projection kernel of every layer (q, k, v, gate, up read a
  channel, o and down write it). Structured L1 magnitude pruning (Li et al.
  2017; LST's code prunes its T5 copy with the same L1 strategy) needs no data;
  one set for all layers, since the side stream carries the same coordinates
  through every layer. W_e and W_l start as the selection of those channels,
  so the side reads exactly the coordinates its pruned weights expect; the
  final side norm starts from the backbone's final norm on them.
* MLP hidden units: per layer, the F/r units with the largest L1 norm of their
  gate and up columns and their down row.
* heads: all N query and K KV heads are kept, each narrowed to H/r dims, so
  the grouped-query structure (N/K query heads per KV head) is unchanged;
  pruning whole heads would break it whenever K < r (SmolLM2 has K = 3). The
  price: the side's attention scores keep the backbone's [B, N, T, S] shape
  (at rank H/r) where attention is not fused.
  Within a head the rotary pairs (j, j + H/2) for j = 0, r, 2r, … are kept: a
  side config with head dim H/r computes the frequencies θ^(−2i/(H/r)) =
  θ^(−2(ir)/H), exactly the backbone's at pair ir, so the pruned q/k rotate as
  they did in the backbone. Magnitude would pick pairs the side's own rotary
  tables could not match.

Parameters (R = D/r, F' = F/r, H' = H/r):
    L · (R·H'·(2N + 2K) + 3·R·F' + 2R  [+ H'·(N + 2K) + R with attention biases]
         [+ 2F' + R with MLP biases])  +  (L + 1)·D·R  +  L  +  R  +  R·D

Sung, Cho & Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning", NeurIPS 2022 (HF PEFT has no equivalent).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from additive_jax.model import llama as llama_lib
from additive_jax.model.config import LlamaConfig
from additive_jax.model.rope import rotary_tables
from additive_jax.peft.base import Method, require_positive_int

GATE_TEMPERATURE = 0.1  # the paper's T in μ = sigmoid(α / T)


@dataclasses.dataclass(frozen=True)
class LadderSide(Method):
  reduction: int = 8

  key: ClassVar[str] = 'ladder'
  presets: ClassVar[dict] = {'ladder': {'reduction': 8}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 3e-3}
  acts_in_backbone: ClassVar[bool] = False
  wants_taps: ClassVar[bool] = True

  def __post_init__(self):
    require_positive_int('LadderSide', 'reduction', self.reduction)

  def check(self, config) -> None:
    r = self.reduction
    for name, size, divisor, what in (
        ('hidden_size', config.hidden_size, r, 'the reduction'),
        ('intermediate_size', config.intermediate_size, r, 'the reduction'),
        ('head_dim', config.head_dim, 2 * r, 'twice the reduction (the side head dim must be even '
                                             'for rotary)')):
      if size % divisor:
        raise ValueError(f'LadderSide(reduction={r}): {name}={size} is not a multiple of {what}')

  def side_config(self, config: LlamaConfig) -> LlamaConfig:
    """The side blocks' config: every width divided by the reduction, the same head counts."""
    r = self.reduction
    return config.replace(hidden_size=config.hidden_size // r,
                          intermediate_size=config.intermediate_size // r,
                          head_dim=config.head_dim // r, param_dtype=jnp.float32, remat='none')

  def num_params(self, config) -> int:
    side = self.side_config(config)
    d, f, h = side.hidden_size, side.intermediate_size, side.head_dim
    n, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
    block = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
    if config.attention_bias:
      block += h * (n + 2 * k) + d
    if config.mlp_bias:
      block += 2 * f + d
    return layers * block + (layers + 1) * config.hidden_size * d + layers + d + d * config.hidden_size

  def init_leaves(self, rng, config, params, tokenizer=None):
    hidden_R, mlp_LF, head_H = keep_indices(params['layers'], config, self.reduction)
    select_DR = jax.nn.one_hot(hidden_R, config.hidden_size, dtype=jnp.float32).T
    return {
        'blocks': prune_blocks(params['layers'], config, hidden_R, mlp_LF, head_H),
        'embed_down_DR': select_DR,
        'down_LDR': jnp.broadcast_to(select_DR, (config.num_layers,) + select_DR.shape),
        'gate_L': jnp.zeros((config.num_layers,), jnp.float32),
        'norm_R': jnp.asarray(params['norm']['scale'])[hidden_R].astype(jnp.float32),
        'up_RD': jnp.zeros((hidden_R.shape[0], config.hidden_size), jnp.float32),
    }

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'ladder_side', 'reduction': self.reduction,
            'side_hidden_size': config.hidden_size // self.reduction,
            'num_layers': config.num_layers}

  def layer_inputs(self, tree, config):
    return None  # nothing of the ladder runs inside the backbone's blocks

  def init_cache(self, config, batch: int, max_len: int, dtype):
    """The side blocks' own keys and values (head dim H/r), slot for slot with the model's."""
    side = self.side_config(config)
    shape = (config.num_layers, batch, max_len, side.num_kv_heads, side.head_dim)
    return {'k_LBSKH': jnp.zeros(shape, dtype), 'v_LBSKH': jnp.zeros(shape, dtype)}

  def final_hidden(self, tree, h_BTD, taps, context, cache=None):
    if context.cache_end is not None and cache is None:
      raise ValueError('LadderSide decodes with its own cache of the side network: make the '
                       'cache with model.init_cache(batch, max_tokens)')
    embedded_BTD, taps_LBTD = jax.lax.stop_gradient(taps)
    h_BTD = jax.lax.stop_gradient(h_BTD)
    side = self.side_config(context.config)
    cos_BTH, sin_BTH = rotary_tables(context.positions_BT, side)
    side_context = context.replace(cos_BTH=cos_BTH, sin_BTH=sin_BTH, config=side)
    block = llama_lib.Block(side, (), parent=None)  # a pure function, not a submodule
    dtype = h_BTD.dtype

    def layer(s_BTR, xs):
      block_params, tap_BTD, down_DR, gate, kv = xs
      mu = jax.nn.sigmoid(gate / GATE_TEMPERATURE).astype(dtype)
      u_BTR = mu * jnp.einsum('btd,dr->btr', tap_BTD, down_DR.astype(dtype)) + (1 - mu) * s_BTR
      s_BTR, (kv, _) = block.apply({'params': block_params}, u_BTR, {}, kv, side_context)
      return s_BTR, kv

    kv = None if cache is None else (cache['k_LBSKH'], cache['v_LBSKH'])
    s_BTR = jnp.einsum('btd,dr->btr', embedded_BTD, tree['embed_down_DR'].astype(dtype))
    s_BTR, kv = jax.lax.scan(layer, s_BTR, (tree['blocks'], taps_LBTD, tree['down_LDR'],
                                            tree['gate_L'], kv))
    s_BTR = nn.RMSNorm(epsilon=side.rms_norm_eps, dtype=dtype).apply(
        {'params': {'scale': tree['norm_R']}}, s_BTR)
    out_BTD = h_BTD + jnp.einsum('btr,rd->btd', s_BTR, tree['up_RD'].astype(dtype))
    return out_BTD, None if kv is None else {'k_LBSKH': kv[0], 'v_LBSKH': kv[1]}


@functools.lru_cache(maxsize=8)
def _layer_axes(config: LlamaConfig):
  """The logical axis names of `params['layers']` ('layers' first), from the model itself."""
  return nn.get_partition_spec(llama_lib.abstract_variables(config))['params']['layers']


def keep_indices(layers, config: LlamaConfig, reduction: int):
  """Kept (hidden channels [D/r], MLP units per layer [L, F/r], head dims [H/r]), ascending."""
  specs = jax.tree_util.tree_flatten_with_path(_layer_axes(config), is_leaf=_is_spec)[0]
  kernels = [(w, tuple(spec)) for (path, spec), w in zip(specs, jax.tree.leaves(layers), strict=True)
             if path[-1].key == 'kernel']

  def l1(w, spec, keep):  # sum |w| over every axis whose name is not in `keep`
    return jnp.abs(w.astype(jnp.float32)).sum(axis=tuple(i for i, a in enumerate(spec) if a not in keep))

  hidden_D = sum(l1(w, spec, ('embed',)) for w, spec in kernels if 'embed' in spec)
  mlp_LF = sum(l1(w, spec, ('layers', 'mlp')) for w, spec in kernels if 'mlp' in spec)
  half, r = config.head_dim // 2, reduction
  pairs = jnp.arange(0, half, r)
  return (_top(hidden_D, config.hidden_size // r), _top(mlp_LF, config.intermediate_size // r),
          jnp.concatenate([pairs, half + pairs]))


def _top(importance, count):
  """The `count` largest along the last axis (ties: the lower index), in ascending order."""
  order = jnp.argsort(-importance, axis=-1, stable=True)
  return jnp.sort(order[..., :count], axis=-1)


def prune_blocks(layers, config: LlamaConfig, hidden_R, mlp_LF, head_H):
  """`params['layers']` narrowed on its 'embed', 'mlp' and 'head_dim' axes, as float32."""
  def prune(spec, w):
    w = jnp.asarray(w, jnp.float32)
    for axis, name in enumerate(spec):
      if name == 'embed':
        w = jnp.take(w, hidden_R, axis=axis)
      elif name == 'head_dim':
        w = jnp.take(w, head_H, axis=axis)
      elif name == 'mlp':  # per layer: the index array broadcasts over the other axes
        shape = [1] * w.ndim
        shape[0], shape[axis] = mlp_LF.shape
        w = jnp.take_along_axis(w, mlp_LF.reshape(shape), axis=axis)
    return w

  return jax.tree.map(prune, _layer_axes(config), layers, is_leaf=_is_spec)


def _is_spec(x) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)
