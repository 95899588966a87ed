"""Prefix tuning: n trainable key/value pairs per layer, per KV head.

Every attention layer l attends over `[P_k^l ; K]` and `[P_v^l ; V]`: n free key
and value vectors for each of the K key/value heads (grouped-query attention:
the query heads of a group share their KV head's prefix) before the real keys.
As in HF PEFT, the prefix enters the attention as a KV cache would: no rotary
embedding is applied to it, every position sees it, and the real tokens take
positions n…n+T−1.

    attn_l(x) = softmax(q [P_k^l ; k(x)]ᵀ / √H) [P_v^l ; v(x)]      P_k^l, P_v^l: [n, K, H]

Parameters: L · n · 2 · K · H (Llama-3.2-3B, n = 200: 11,468,800). The prefix
takes n positions, so the model refuses a call with n + T > max_position_embeddings.

With `projection_dim=R` (Li & Liang's reparameterization, PEFT's
`prefix_projection=True`) the prefix is produced during training by
    [P_k ; P_v] = W_out · tanh(W_in · E + b_in) + b_out,    E: [n, K·H]
(PEFT's `token_dim` for a GQA model is K·H, so E is [n, K·H] and W_out has
L·2·K·H outputs), with n·KH + KH·R + R + 2·L·KH·(R + 1) parameters;
`PrefixTuning.fold` evaluates it once into the plain per-layer prefix for
inference and export.

AdapterHub's prefix tuning (`PrefixTuningConfig`, adapters 1.3.0
methods/prefix_tuning.py) differs from PEFT's in two ways, each a field:
`embedding_width='hidden'` (its `wte` is [n, D], not [n, K·H]: then E is [n, D]
and the count's first two terms are n·D + D·R), and `positions='from_zero'`
(its real tokens keep positions 0…T−1: the prefix takes no position, which
changes every q·k against the unrotated prefix). AdapterHub's head dim is
hidden/heads (methods/prefix_tuning.py:369); where a model's is not, its prefix
has the wrong width and cannot load; we use the model's. `gate` (UniPELT,
peft/gate.py) scales the prefix keys and values for each query by a gate on the
normed state entering attention (L·(D + 1) more parameters).

Initialization, `init='random'` (the default), follows HF PEFT's: the prefix
(or E) ~ N(0, 1), as a `torch.nn.Embedding`; W_in, W_out and their biases
~ U(±1/√fan_in), as a `torch.nn.Linear`. `init='vocab'` (without a projection)
is Li & Liang's "activations of real words" (§7.2): n token ids drawn from the
vocabulary are run through the frozen base, and each layer's prefix starts as
the keys (rotated at positions 0…n−1) and values it caches for them, so at
init the model reads every input as if those n tokens came before it. A
random N(0, 1) prefix is far from any key or value the model makes (SmolLM2's
SST-2 loss at init 4.8 → 7.9); real activations start it where the model
already works. Prefixes are not the identity at init by nature; their effect
is tested against HF PEFT, and the 'vocab' init against the base model reading
the sampled tokens first.

Layout: PEFT's encoder output [n, L·2·K·H] is viewed [n, L·2, K, H]; layer l's
key is entry 2l of the L·2 axis and its value entry 2l + 1 (`view`,
`permute([2, 0, 3, 1, 4])`, `split(2)` in `PeftModel.get_prompt`). Here keys and
values are kept apart with the layers axis first: `k_LPKH`, `v_LPKH`.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021. HF PEFT: `PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=...,
encoder_hidden_size=R)`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.model.kv_cache import KVCache
from additive_jax.model.llama import Llama
from additive_jax.peft.base import Method, require_positive_int
from additive_jax.peft.gate import gate_leaves, gate_values, require_gate


INITS = ('random', 'vocab')
EMBEDDING_WIDTHS = ('kv', 'hidden')       # E: [n, K·H] (HF PEFT) or [n, D] (AdapterHub)
POSITIONS = ('after_prefix', 'from_zero')  # real tokens at n… (HF PEFT) or at 0… (AdapterHub)


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
  """`PrefixTuning(num_tokens, projection_dim=None, init='random'|'vocab', embedding_width='kv',
  positions='after_prefix', gate='')`."""
  num_tokens: int
  projection_dim: int | None = None
  init: str = 'random'
  embedding_width: str = 'kv'
  positions: str = 'after_prefix'
  gate: str = ''

  key: ClassVar[str] = 'prefix'
  presets: ClassVar[dict] = {'prefix': {'num_tokens': 20, 'init': 'vocab'}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 5e-3}

  def __post_init__(self):
    require_positive_int('PrefixTuning', 'num_tokens', self.num_tokens)
    if self.projection_dim is not None:
      require_positive_int('PrefixTuning', 'projection_dim', self.projection_dim)
    if self.init not in INITS:
      raise ValueError(f'PrefixTuning init must be one of {INITS}, got {self.init!r}')
    if self.init == 'vocab' and self.projection_dim is not None:
      raise ValueError("PrefixTuning(init='vocab') sets the prefix itself; with projection_dim the "
                       "prefix is an MLP's output, so use init='random' there")
    for name, allowed in (('embedding_width', EMBEDDING_WIDTHS), ('positions', POSITIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'PrefixTuning {name} must be one of {allowed}, got '
                         f'{getattr(self, name)!r}')
    if self.embedding_width != 'kv' and self.projection_dim is None:
      raise ValueError("PrefixTuning embedding_width is the width of the projection's input: "
                       'it needs a projection_dim')
    require_gate('PrefixTuning', self.gate)

  @property
  def causal(self) -> bool:
    return self.gate != 'sequence'

  @property
  def prefix_gated(self) -> bool:
    return bool(self.gate)

  @property
  def num_prefix_positions(self) -> int:
    return self.num_tokens if self.positions == 'after_prefix' else 0

  @property
  def num_prefix_tokens(self) -> int:
    return self.num_tokens

  def check(self, config) -> None:
    if self.num_tokens >= config.max_position_embeddings:
      raise ValueError(f'PrefixTuning num_tokens={self.num_tokens} leaves no position for a real token '
                       f'(max_position_embeddings={config.max_position_embeddings})')

  def token_matmul_params(self, config) -> int:
    return 0  # the slots cost the attention they get; the reparametrization runs once a step

  def num_params(self, config) -> int:
    layers, n, kh = config.num_layers, self.num_tokens, config.num_kv_heads * config.head_dim
    gates = layers * (config.hidden_size + 1) if self.gate else 0
    if self.projection_dim is None:
      return layers * n * 2 * kh + gates
    r, e = self.projection_dim, self._embedding_width(config)
    return n * e + e * r + r + 2 * layers * kh * (r + 1) + gates

  def _embedding_width(self, config) -> int:
    return (config.num_kv_heads * config.head_dim if self.embedding_width == 'kv'
            else config.hidden_size)

  def init_leaves(self, rng, config, params, tokenizer=None):
    if not self.gate:
      return self._prefix_leaves(rng, config, params)
    rng, gate_key = jax.random.split(rng)
    return {**self._prefix_leaves(rng, config, params),
            **gate_leaves(gate_key, config.num_layers, config.hidden_size, 'linear')}

  def _prefix_leaves(self, rng, config, params):
    layers, n, k, h = config.num_layers, self.num_tokens, config.num_kv_heads, config.head_dim
    if self.init == 'vocab':
      return cached_keys_values(config, params, vocab_ids(rng, config, n))
    keys = jax.random.split(rng, 7)
    if self.projection_dim is None:
      return {'k_LPKH': jax.random.normal(keys[0], (layers, n, k, h), jnp.float32),
              'v_LPKH': jax.random.normal(keys[1], (layers, n, k, h), jnp.float32)}
    r, d = self.projection_dim, config.hidden_size

    def linear(key, shape, fan_in):  # torch.nn.Linear's default: U(±1/√fan_in)
      bound = 1.0 / fan_in ** 0.5
      return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    if self.embedding_width == 'kv':
      embedding = {'embedding_PKH': jax.random.normal(keys[0], (n, k, h), jnp.float32),
                   'in_KHR': linear(keys[1], (k, h, r), k * h),
                   'in_bias_R': linear(keys[2], (r,), k * h)}
    else:
      embedding = {'embedding_PD': jax.random.normal(keys[0], (n, d), jnp.float32),
                   'in_DR': linear(keys[1], (d, r), d), 'in_bias_R': linear(keys[2], (r,), d)}
    return {**embedding,
            'out_k_LRKH': linear(keys[3], (layers, r, k, h), r),
            'out_v_LRKH': linear(keys[4], (layers, r, k, h), r),
            'out_k_bias_LKH': linear(keys[5], (layers, k, h), r),
            'out_v_bias_LKH': linear(keys[6], (layers, k, h), r)}

  def shape_alike(self) -> PrefixTuning:
    # the plain init: 'vocab' would run the base for the same shapes
    return dataclasses.replace(self, init='random')

  def file_fields(self, config) -> dict:
    changed = {name: getattr(self, name) for name, default in
               (('embedding_width', 'kv'), ('positions', 'after_prefix'), ('gate', ''))
               if getattr(self, name) != default}  # an existing method's file is unchanged
    return {'adapter_type': 'prefix_tuning', 'num_virtual_tokens': self.num_tokens,
            'projection_dim': self.projection_dim, 'num_layers': config.num_layers,
            'num_kv_heads': config.num_kv_heads, 'head_dim': config.head_dim, **changed}

  def layer_inputs(self, tree, config):
    """`{'k_LPKH', 'v_LPKH'}` (and the gate's leaves); the scan hands each layer its slice."""
    if self.projection_dim is None:
      return tree
    gates = {name: tree[name] for name in ('gate', 'gate_bias') if name in tree}
    if 'embedding_PD' in tree:
      in_PR = jnp.einsum('pd,dr->pr', tree['embedding_PD'], tree['in_DR'])
    else:
      in_PR = jnp.einsum('pkh,khr->pr', tree['embedding_PKH'], tree['in_KHR'])
    hidden_PR = jnp.tanh(in_PR + tree['in_bias_R'])

    def out(kernel_LRKH, bias_LKH):
      return jnp.einsum('pr,lrkh->lpkh', hidden_PR, kernel_LRKH) + bias_LKH[:, None]

    return {'k_LPKH': out(tree['out_k_LRKH'], tree['out_k_bias_LKH']),
            'v_LPKH': out(tree['out_v_LRKH'], tree['out_v_bias_LKH']), **gates}

  def prefix_kv(self, p):
    return p['k_LPKH'], p['v_LPKH']

  def prefix_gate(self, p, x_BTD):
    return gate_values(p, x_BTD, self.gate) if self.gate else None

  def fold(self, tree, config) -> tuple[PrefixTuning, dict]:
    """`(PrefixTuning(num_tokens, ...), plain tree)`: the reparameterization evaluated once.

    The folded method gives the same logits and holds L·n·2·K·H parameters (and its gates).
    """
    plain = PrefixTuning(self.num_tokens, positions=self.positions, gate=self.gate)
    return plain, self.layer_inputs(tree, config)


def vocab_ids(rng, config, num_tokens: int) -> jax.Array:
  """[1, n] token ids drawn uniformly from the vocabulary: the 'vocab' init's words."""
  return jax.random.randint(rng, (1, num_tokens), 0, config.vocab_size)


def cached_keys_values(config, params, ids_1P) -> dict:
  """`{'k_LPKH', 'v_LPKH'}`: what the frozen base caches, layer by layer, reading `ids_1P` at
  positions 0…n−1."""
  base = Llama(config, parent=None)  # a model of its own, also when called from a model's method
  _, cache = base.apply({'params': params}, ids_1P,
                        cache=KVCache.create(config, 1, ids_1P.shape[1]))
  return {'k_LPKH': cache.k_LBSKH[:, 0].astype(jnp.float32),
          'v_LPKH': cache.v_LBSKH[:, 0].astype(jnp.float32)}
