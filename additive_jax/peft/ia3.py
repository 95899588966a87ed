"""(IA)³: learned vectors that rescale the keys, the values and the MLP hidden activation.

"Infused Adapter by Inhibiting and Amplifying Inner Activations": three vectors
per layer multiply activations elementwise, nothing else is added.

    k = l_k ⊙ (W_k x)        v = l_v ⊙ (W_v x)        (before the rotary embedding)
    mlp(x) = W_down (l_ff ⊙ (silu(W_gate x) · W_up x))

l_k and l_v have K·H entries (one per KV-head channel, so grouped-query heads
share them), l_ff has F. They start at one, so (IA)³ is the identity at init.
This is HF PEFT's (IA)³ on Llama: `target_modules=['k_proj', 'v_proj',
'down_proj']`, `feedforward_modules=['down_proj']` (a feed-forward target scales
its input, the others their output, bias included).

Parameters: L · (2·K·H + F) (Llama-3.2-1B: 16 · (2·512 + 8192) = 147,456;
Llama-3.2-3B: 28 · (2·1024 + 8192) = 286,720).

Merging folds each vector into the weight it multiplies: l_k into the output
columns of k_proj (and its bias, with attention_bias), l_v into v_proj, l_ff into
the input rows of down_proj (its bias is untouched: it is added after the
product). Unmerging divides back, so it needs every entry non-zero, and restores
the weights up to two fp32 roundings (|ΔW| ≤ (2u + u²)|W|, u = 2⁻²⁴).

Leaves (fp32, leading layers axis): {'l_k': [L, K·H], 'l_v': [L, K·H], 'l_ff': [L, F]}.
HF PEFT keeps them as `...self_attn.k_proj.ia3_l` [K·H, 1], `...v_proj.ia3_l`
[K·H, 1], `...mlp.down_proj.ia3_l` [1, F].

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", NeurIPS 2022. HF PEFT: `IA3Config()`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from additive_jax.peft.base import Method
from additive_jax.peft.merge import stages

# params path of the weights each vector folds into, and whether it scales the output (the
# kernel's trailing head axes) or the input (down_proj's leading F axis)
_FOLDS = {'l_k': (('layers', 'self_attn', 'k_proj'), 'output'),
          'l_v': (('layers', 'self_attn', 'v_proj'), 'output'),
          'l_ff': (('layers', 'mlp', 'down_proj'), 'input')}
_STAGE_LEAVES = {'project': ('l_k', 'l_v'), 'mlp_hidden': ('l_ff',)}


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  key: ClassVar[str] = 'ia3'
  presets: ClassVar[dict] = {'ia3': {}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 3e-3}
  mergeable: ClassVar[bool] = True

  def token_matmul_params(self, config) -> int:
    return 0  # elementwise scalings, no matrix product

  def num_params(self, config) -> int:
    return config.num_layers * (2 * config.num_kv_heads * config.head_dim + config.intermediate_size)

  def init_leaves(self, rng, config, params, tokenizer=None):
    layers, kh = config.num_layers, config.num_kv_heads * config.head_dim
    return {'l_k': jnp.ones((layers, kh), jnp.float32),
            'l_v': jnp.ones((layers, kh), jnp.float32),
            'l_ff': jnp.ones((layers, config.intermediate_size), jnp.float32)}

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'ia3', 'target_modules': ['k_proj', 'v_proj', 'down_proj'],
            'num_layers': config.num_layers}

  def project(self, p, name, x, y):
    if name in ('k', 'v'):  # y_BTKH; the vector is the flattened K·H channels
      return y * p[f'l_{name}'].reshape(y.shape[-2:]).astype(y.dtype)
    return y

  def mlp_hidden(self, p, h):
    return h * p['l_ff'].astype(h.dtype)

  def merge(self, tree, params, config, stage=None):
    """Params with the vectors folded in. `stage` ('project': l_k, l_v; 'mlp_hidden': l_ff;
    None: both) lets `aj.peft.merge` order the folds of several methods (see merge.py)."""
    return _fold(tree, params, _stage_leaves(stage), jnp.multiply)

  def unmerge(self, tree, params, config, stage=None):
    names = _stage_leaves(stage)
    for name in names:
      # merge/unmerge are one-off eager tree surgery, so the check can read the values
      zeros = int(np.sum(np.asarray(tree[name]) == 0))
      if zeros:
        raise ValueError(f'(IA)³ cannot be unmerged: {name} has {zeros} zero entries, and '
                         'a weight multiplied by zero cannot be divided back')
    return _fold(tree, params, names, jnp.divide)


def _stage_leaves(stage) -> tuple[str, ...]:
  return sum((_STAGE_LEAVES[s] for s in stages(stage)), ())


def _fold(tree, params, names, op):
  """`op(weight, vector)` for each named vector, in fp32, cast back to the weight's dtype."""
  flat = traverse_util.flatten_dict(params)
  for name in names:
    module, side = _FOLDS[name]
    scale_LC = jnp.asarray(tree[name], jnp.float32)
    kernel = flat[module + ('kernel',)]
    if side == 'output':  # kernel [L, D, K, H]: scale the K·H output channels
      scale = scale_LC.reshape(kernel.shape[:1] + (1,) + kernel.shape[2:])
    else:                 # kernel [L, F, D]: scale the F input rows
      scale = scale_LC[:, :, None]
    flat[module + ('kernel',)] = op(kernel.astype(jnp.float32), scale).astype(kernel.dtype)
    bias = flat.get(module + ('bias',))
    if bias is not None and side == 'output':  # y = l ⊙ (W x + b): the bias is scaled too
      flat[module + ('bias',)] = op(bias.astype(jnp.float32),
                                    scale_LC.reshape(bias.shape)).astype(bias.dtype)
  return traverse_util.unflatten_dict(flat)
