"""A Llama decoder in Flax linen whose blocks expose named sites for PEFT methods.

Einsum letters, used in every shape suffix of the project:
  B batch   T query length   S key length   D model width   N query heads
  K kv heads   H head dim    F d_ff (MLP hidden)   V vocab   L layers   R adapter rank/dim
  P virtual tokens (prompt vectors, prefix key/value slots)

Pre-norm block:  r = x; f = Attn(RMSNorm(x)); x = r + f; r = x; f = MLP(RMSNorm(x)); x = r + f.
With no method configured, logits equal `transformers`' `LlamaForCausalLM`.

Variables: `{'params': frozen base (logical axis names on every weight; a weight may be a
`QuantizedWeight`, widened where a module reads it: model/quant.py),
'peft': {method.key: its trainable leaves}}`. Methods (additive_jax/peft) act at
the sites named in hooks.py; the block calls every method's hook at every site,
so adding a method never edits this file.

Activations carry logical axis names too (`ACTIVATION_AXES`): under
`nn.logical_axis_rules(rules)` and a mesh set with `jax.set_mesh`, the residual
stream and the logits keep their batch axis split as the rules say, so FSDP
gathers weights, never activations. With no mesh in context nothing is constrained.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from additive_jax.model.attention import attend_on_mesh
from additive_jax.model.config import REMAT_POLICIES, LlamaConfig
from additive_jax.model.context import AttentionContext, call_context
from additive_jax.model.hooks import Hooks, check_methods, init_methods
from additive_jax.model.kv_cache import KVCache
from additive_jax.model.prefix_slots import ungate, with_prefixes
from additive_jax.model.quant import is_quantized, widened
from additive_jax.model.rope import apply_rotary

# The logical axes of the residual stream [B, T, D] and the logits [B, T, V].
ACTIVATION_AXES = ('activation_batch', 'activation_length', 'activation_embed')
LOGITS_AXES = ('activation_batch', 'activation_length', 'activation_vocab')


class _LogicalWeight(nn.LogicallyPartitioned):
  """A weight boxed with its logical axis names. `nn.DenseGeneral` unboxes its kernel at the
  flattened [inputs, outputs] shape before reshaping it, also when it only checks the shape of
  a weight it is given (so inside every sharded step); the names of the unflattened shape
  cannot constrain that value, so a box whose value's rank is not its names' applies none."""

  def unbox(self, apply_constraint=True):
    return super().unbox(apply_constraint and self.value.ndim == len(self.names))


def _init(axes: tuple[str, ...], init=nn.initializers.normal(0.02)):
  return lambda *args: _LogicalWeight(init(*args), axes)


def _project_hooks(methods, p, name: str, x, y):
  """Every method's `project` hook, in order, at projection `name` (y = W x)."""
  for method in methods:
    y = method.project(p[method.key], name, x, y)
  return y


def _attend(cfg: LlamaConfig, q_BTNH, k_BSKH, v_BSKH, ctx: AttentionContext):
  """softmax(q kᵀ / √H) v: without a cache by `cfg.attention` (model/attention.py, the scores
  recomputed in the backward pass rather than stored), a decoding step by its cache mask."""
  k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
  if ctx.mask_BTS is None:  # the batch split over the mesh axes the rules in force name
    batch_axes = (nn.logical_to_mesh_axes(ACTIVATION_AXES[:1]) or (None,))[0]
    return attend_on_mesh(q_BTNH, k_BSKH, v_BSKH, ctx.segment_ids_BT, batch_axes,
                          num_prefix=ctx.num_prefix, num_virtual=ctx.num_virtual,
                          implementation=cfg.attention)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=ctx.mask_BTS[:, None])


class Attention(nn.Module):
  config: LlamaConfig
  methods: Sequence[Hooks]

  @nn.compact
  def __call__(self, x_BTD, p, kv, ctx: AttentionContext, layer=None):
    cfg = self.config

    def projection(name, heads, heads_axes):
      return nn.DenseGeneral(heads, use_bias=cfg.attention_bias, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, kernel_init=_init(('embed',) + heads_axes),
                             bias_init=_init(heads_axes, nn.initializers.zeros), name=name)

    project = functools.partial(_project_hooks, self.methods, p)

    heads = (cfg.num_heads, cfg.head_dim)
    kv_heads = (cfg.num_kv_heads, cfg.head_dim)
    k_proj = projection('k_proj', kv_heads, ('kv_heads', 'head_dim'))
    v_proj = projection('v_proj', kv_heads, ('kv_heads', 'head_dim'))
    q_BTNH = project('q', x_BTD, projection('q_proj', heads, ('q_heads', 'head_dim'))(x_BTD))
    k_BTKH = project('k', x_BTD, k_proj(x_BTD))
    v_BTKH = project('v', x_BTD, v_proj(x_BTD))
    q_BTNH = apply_rotary(q_BTNH, ctx.cos_BTH, ctx.sin_BTH)
    k_BTKH = apply_rotary(k_BTKH, ctx.cos_BTH, ctx.sin_BTH)

    if kv is not None and layer is None:  # this layer's cache: write this step's keys, attend
      k_cache, v_cache = kv                # over all slots
      start = (0, ctx.cache_end, 0, 0)
      k_BTKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
      v_BTKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
      kv = (k_BTKH, v_BTKH)
    elif kv is not None:  # every layer's cache [L, B, S, K, H], carried: written in place
      start = (layer, 0, ctx.cache_end, 0, 0)
      kv = tuple(jax.lax.dynamic_update_slice(cache, new[None].astype(cache.dtype), start)
                 for cache, new in zip(kv, (k_BTKH, v_BTKH)))
      k_BTKH, v_BTKH = (jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False) for cache in kv)
    prefixes = [(*prefix, method.prefix_gate(p[method.key], x_BTD)) for method in self.methods
                if (prefix := method.prefix_kv(p[method.key])) is not None]
    queries_BTNH, keys_BSKH, values_BSKH, gate_BT1 = with_prefixes(q_BTNH, k_BTKH, v_BTKH,
                                                                   prefixes)
    out_BTNH = _attend(cfg, queries_BTNH, keys_BSKH, values_BSKH, ctx)
    if gate_BT1 is not None:
      out_BTNH = ungate(out_BTNH, gate_BT1)

    def project_kv(x_PD):  # a method's own vectors, as one row of tokens' inputs
      x_1PD = x_PD[None]
      return project('k', x_1PD, k_proj(x_1PD))[0], project('v', x_1PD, v_proj(x_1PD))[0]

    for method in self.methods:
      delta_BTNH = method.attn_heads_delta(p[method.key], q_BTNH, project_kv)
      if delta_BTNH is not None:
        out_BTNH = out_BTNH + delta_BTNH.astype(out_BTNH.dtype)
    o_proj = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias,
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=_init(('q_heads', 'head_dim', 'embed')),
                             bias_init=_init(('embed',), nn.initializers.zeros), name='o_proj')
    return project('o', out_BTNH, o_proj(out_BTNH)), kv


class MLP(nn.Module):
  config: LlamaConfig
  methods: Sequence[Hooks]

  @nn.compact
  def __call__(self, x_BTD, p):
    cfg = self.config

    def dense(name, features, axes):
      return nn.Dense(features, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=_init(axes), bias_init=_init(axes[-1:], nn.initializers.zeros),
                      name=name)

    project = functools.partial(_project_hooks, self.methods, p)

    gate_BTF = project('gate', x_BTD, dense('gate_proj', cfg.intermediate_size, ('embed', 'mlp'))(x_BTD))
    up_BTF = project('up', x_BTD, dense('up_proj', cfg.intermediate_size, ('embed', 'mlp'))(x_BTD))
    h_BTF = nn.silu(gate_BTF) * up_BTF
    for method in self.methods:
      h_BTF = method.mlp_hidden(p[method.key], h_BTF)
    return project('down', h_BTF, dense('down_proj', cfg.hidden_size, ('mlp', 'embed'))(h_BTF))


def _rms_norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    scale_init=_init(('embed',), nn.initializers.ones), name=name)


def _add_deltas(r, f, deltas):
  x = r + f
  for delta in deltas:
    if delta is not None:
      x = x + delta.astype(x.dtype)
  return x


class Block(nn.Module):
  """One decoder layer; scanned over the `layers` axis by `Llama`. `kv`: this layer's cache
  (k, v) [B, S, K, H] each, or None. With `carry_cache` (decoding), the scan carries
  `(x_BTD, every layer's cache, layer index)` instead of `x_BTD`, and the layer writes its
  new keys into the carried buffers in place: no layer's cache is copied into a new one."""
  config: LlamaConfig
  methods: Sequence[Hooks]
  keep_tap: bool = False
  carry_cache: bool = False

  @nn.compact
  def __call__(self, x_BTD, p, kv, ctx: AttentionContext):
    layer = None
    if self.carry_cache:
      x_BTD, kv, layer = x_BTD
    r_BTD = x_BTD
    f_BTD, kv = Attention(self.config, self.methods, name='self_attn')(
        _rms_norm(self.config, 'input_layernorm')(x_BTD), p, kv, ctx, layer)
    x_BTD = _add_deltas(r_BTD, f_BTD, [m.attn_delta(p[m.key], r_BTD, f_BTD) for m in self.methods])
    r_BTD = x_BTD
    f_BTD = MLP(self.config, self.methods, name='mlp')(
        _rms_norm(self.config, 'post_attention_layernorm')(x_BTD), p)
    x_BTD = _add_deltas(r_BTD, f_BTD, [m.mlp_delta(p[m.key], r_BTD, f_BTD) for m in self.methods])
    for method in self.methods:
      x_BTD = method.layer_output(p[method.key], x_BTD, ctx)
    x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
    tap = x_BTD if self.keep_tap else None
    if self.carry_cache:
      return (x_BTD, kv, layer + 1), (None, tap)
    return x_BTD, (kv, tap)


class Llama(nn.Module):
  """`Llama(config, peft=(aj.peft.IA3(), ...))`; `apply(variables, tokens [B,T]) -> logits [B,T,V]`.

  Optional inputs: `attention_mask [B,T]` (1 = token, 0 = padding),
  `positions [B,T]` (default arange, after any virtual tokens), `segment_ids [B,T]`
  (packed sequences: a token attends only within its segment), and `cache`
  (a `KVCache`; then the call returns `(logits, cache)`).

  Where the caller needs fewer logits than every position's: `logits_at [B, M]`
  (positions within the T tokens) returns logits [B, M, V] at those alone, and
  `return_hidden=True` returns the final hidden states [B, T, D] instead, for a loss
  that applies the LM head itself (`lm_head_logits`) at the positions it needs.
  """
  config: LlamaConfig
  peft: Sequence[Hooks] = ()

  def __post_init__(self):
    object.__setattr__(self, 'peft', tuple(self.peft))
    check_methods(self.peft, self.config)
    super().__post_init__()

  def init_peft(self, rng, params, tokenizer=None) -> dict[str, Any]:
    """`{'params': params, 'peft': {key: leaves}}`, every method at its initial value."""
    return {'params': params,
            'peft': init_methods(self.peft, rng, self.config, widened(params), tokenizer)}

  @property
  def num_virtual_tokens(self) -> int:
    """Vectors the methods prepend to every sequence (they take cache slots too)."""
    return sum(m.num_virtual_tokens for m in self.peft)

  def init_cache(self, batch: int, max_tokens: int, dtype=None) -> KVCache:
    """An empty cache for `max_tokens` tokens a row (prompt and generated), plus the slots of
    any prepended vectors, with the methods' own decoding state."""
    cfg, dtype = self.config, dtype or self.config.dtype
    length = max_tokens + self.num_virtual_tokens
    states = {m.key: m.init_cache(cfg, batch, length, dtype) for m in self.peft}
    return KVCache.create(cfg, batch, length, dtype,
                          {key: state for key, state in states.items() if state is not None})

  @nn.compact
  def __call__(self, tokens_BT, attention_mask=None, positions=None, segment_ids=None,
               cache: KVCache | None = None, logits_at=None, return_hidden: bool = False):
    cfg = self.config
    trees = self._peft_trees()
    methods = tuple(m for m in self.peft if m.key in trees)
    embedder = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        embedding_init=_init(('vocab', 'embed')), name='embed_tokens')
    batch, length = tokens_BT.shape
    x_BTD = nn.with_logical_constraint(embedder(tokens_BT), ACTIVATION_AXES)
    for method in methods:
      x_BTD = method.embed(trees[method.key], x_BTD)
    virtual = sum(m.num_virtual_tokens for m in methods)
    # prepended vectors enter once per sequence: without a cache, or in the prefill
    prepended = virtual if cache is None or cache.fresh else 0
    if prepended:
      vectors_PD = jnp.concatenate([m.prepend(trees[m.key]) for m in methods
                                    if m.num_virtual_tokens]).astype(x_BTD.dtype)
      x_BTD = jnp.concatenate([jnp.broadcast_to(vectors_PD, (batch,) + vectors_PD.shape), x_BTD],
                              axis=1)
    embedded_BTD = x_BTD
    if cache is not None and not all(m.causal for m in methods):
      raise ValueError(f'{next(m for m in methods if not m.causal).call_string()} reads every '
                       'token of the sequence at each token: it cannot decode with a KV cache')
    prefix = sum(m.num_prefix_positions for m in methods)
    if cache is None and prefix + virtual + length > cfg.max_position_embeddings:
      raise ValueError(f'{length} tokens + {virtual} prompt vectors + {prefix} prefix positions need '
                       f'{prefix + virtual + length} positions; the model has '
                       f'max_position_embeddings={cfg.max_position_embeddings}')

    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = jnp.concatenate(
        [jnp.ones((batch, prepended), bool), attention_mask.astype(bool)], axis=1)
    if positions is None:  # a cache's slots count the prepended vectors already
      start = 0 if cache is None else cache.end
      positions = start + jnp.arange(length + prepended, dtype=jnp.int32)[None].repeat(batch, 0)
    else:  # positions of the tokens; the prepended vectors take 0…P−1 before them
      positions = positions + virtual
      if prepended:
        positions = jnp.concatenate(
            [jnp.arange(prepended, dtype=jnp.int32)[None].repeat(batch, 0), positions], axis=1)
    positions = positions + prefix
    ctx, cache = call_context(cfg, positions, attention_mask, segment_ids, cache, prepended,
                              sum(m.num_prefix_tokens for m in methods),
                              0 if cache is None or cache.fresh else virtual,
                              any(m.wants_token_order for m in methods))

    block, remat = Block, cfg.remat
    if remat == 'none' and is_quantized(self.variables.get('params', {})):
      # A base in blocks (model/quant.py): a backward pass without remat would keep every
      # layer's widened weights, the scan stacking them (the whole base at full width, more than
      # the blocks save); 'dots' keeps the matmul outputs alone and widens each weight again
      remat = 'dots'
    if remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=False)
    layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    layer_inputs = {m.key: m.layer_inputs(trees[m.key], cfg) for m in methods}
    wants_taps = any(m.wants_taps for m in methods)
    if cache is None:
      x_BTD, (_, taps_LBTD) = layers(cfg, methods, wants_taps, name='layers')(
          x_BTD, layer_inputs, None, ctx)
    else:  # the cache carried through the layers, updated in place (Block)
      carry = (x_BTD, (cache.k_LBSKH, cache.v_LBSKH), jnp.zeros((), jnp.int32))
      (x_BTD, kv, _), (_, taps_LBTD) = layers(cfg, methods, wants_taps, True, name='layers')(
          carry, layer_inputs, None, ctx)
    taps = (embedded_BTD, taps_LBTD) if wants_taps else None  # the embeddings, each layer's output
    x_BTD = _rms_norm(cfg, 'norm')(x_BTD)
    states = {} if cache is None else dict(cache.methods)
    for method in methods:
      x_BTD, state = method.final_hidden(trees[method.key], x_BTD, taps, ctx, states.get(method.key))
      if state is not None:
        states[method.key] = state
    x_BTD = x_BTD[:, prepended:]
    if return_hidden:
      if cache is not None:
        raise ValueError('return_hidden cannot be combined with a KV cache')
      return x_BTD
    if logits_at is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at[..., None].astype(jnp.int32), axis=1)
    if cfg.tie_word_embeddings:
      logits_BTV = embedder.attend(x_BTD)
    else:
      logits_BTV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, kernel_init=_init(('embed', 'vocab')),
                            name='lm_head')(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), LOGITS_AXES)
    if cache is None:
      return logits_BTV
    return logits_BTV, cache.replace(k_LBSKH=kv[0], v_LBSKH=kv[1], end=cache.end + length + prepended,
                                     methods=states, fresh=False)

  def _peft_trees(self) -> dict[str, Any]:
    if not self.peft:
      return {}
    if not self.has_variable('peft', self.peft[0].key):
      if self.is_initializing():  # `init` builds the base alone; `init_peft` adds the methods
        return {}
      raise ValueError("variables has no 'peft' partition for this model's methods; "
                       'build it with model.init_peft(rng, params)')
    trees = self.variables['peft']
    missing = [m.key for m in self.peft if m.key not in trees]
    if missing:
      raise ValueError(f"variables['peft'] lacks {missing}; it has {sorted(trees)}")
    return dict(trees)


def lm_head_logits(config: LlamaConfig, params, x_MD) -> jax.Array:
  """The LM head of `Llama` applied to final hidden states [..., D] (from `return_hidden`):
  fp32 logits [..., V], computed as the model computes them (tied embedding or `lm_head`)."""
  if config.tie_word_embeddings:
    weight_VD = nn.unbox(params['embed_tokens']['embedding'])  # widened if in blocks
    x_MD, weight_VD = nn.dtypes.promote_dtype(x_MD, weight_VD, dtype=config.dtype)
    return jnp.dot(x_MD, weight_VD.T).astype(jnp.float32)
  kernel_DV = nn.unbox(params['lm_head']['kernel'])
  x_MD, kernel_DV = nn.dtypes.promote_dtype(x_MD, kernel_DV, dtype=config.dtype)
  return jnp.dot(x_MD, kernel_DV).astype(jnp.float32)


def abstract_variables(config: LlamaConfig):
  """The base's variables as shapes and dtypes, boxed with their logical axis names
  (`nn.LogicallyPartitioned`), without allocating a weight."""
  return jax.eval_shape(Llama(config, parent=None).init, jax.random.key(0),
                        jnp.zeros((1, 1), jnp.int32))


def abstract_params(config: LlamaConfig):
  """The base params as unboxed shapes and dtypes: what init_peft and counting need."""
  return nn.unbox(abstract_variables(config))['params']
