"""AdapterFusion: N bottleneck adapters trained before, frozen, combined in every layer by attention.

At each site where the adapters act (after the MLP; after attention too for houlsby), with
r the stream before the sublayer and f its output, every fused adapter n reads the
adapter input h of its placement (r + f for pfeiffer, f for houlsby) and gives
u_n = s_n · A_n(h) (bottleneck.py); a learned attention over the N of them, per token,
replaces their sum:

    q = W_q·query + b_q      k_n = W_k·u_n + b_k      v_n = W_v·u_n
    p = softmax_n(q·k_n / T)                           x = r + f + Σ_n p_n v_n

`query` is what the stream holds there (r + f; f with `query_before_ln`, f for houlsby).
As AdapterHub's `BertFusion` (adapters 1.3.0, methods/modeling.py): W_v has no bias and
starts at the identity with 1e-6 elsewhere (`value_initialized`), W_q and W_k at N(0, 0.02²)
with zero biases; `projections` leaves any of the three out (the identity instead; the
'static' fusion of the paper has no value matrix); `value_before_softmax=False` applies W_v
to Σ_n p_n u_n instead; `residual_before` adds the residual f to every u_n before the
projections (AdapterHub adds it in place to the one tensor its keys and values share, so
the keys see it too) and not after: x = r + Σ_n p_n v_n. Only the fusion layers train; the
adapters are frozen leaves (`frozen_keys`), read from their files when it is initialized.
(b_k adds the same q·b_k to every adapter's score, which the softmax ignores: its gradient is
zero; it is kept because AdapterHub's layer and files have it.)

Temperature (`temperature=True`): T starts at 50 and falls by 50/1000 a step to 1,
T_s = max(50 − 0.05·s, 1) at optimizer step s. AdapterHub lowers it after every forward
pass of the layer (`self.T = max(self.T − self.reduction, 1.0)`), evaluation and
micro-batches included, and never saves it (a loaded fusion starts at 50 again); here it is
a frozen leaf the train step sets from its step count (`after_step`, jit-friendly, the same
on resume), kept in checkpoints and in our files: a run's T is the one its last step used.
Without it T = 1 and there is no leaf.

Regularization (`regularization=True`, with a value matrix): AdapterHub's trainer adds
0.01 · Σ ‖I − W_v‖²_F over every fusion layer to the loss, after each step's `zero_grad`
(`AdapterTrainerCallback.on_step_end`), so it joins the next step's gradient: step 0 has
none. The same here (`extra_loss`, zero at step 0), once a step whatever the accumulation,
outside the logged loss. AdapterHub's trainer applies it whenever a value matrix trains, its
`regularization` flag unread; here the flag switches it off.

Refused: fewer than two adapters; adapters of different placements, other methods, gates;
parallel adapters, on which AdapterHub's `Fuse` adds the residual r a second time
(BertFusion adds it, then `ParallelAdapter.post_forward`: base logits change with every
adapter at zero). Dropout on the scores (AdapterHub's `dropout_prob`, 0 on Llama) is not
modelled: inference is the same.

Parameters, with P the learned projections, S the sites (1; 2 for houlsby), L layers, D width:
    trainable  S · L · (|P| · D² + |P ∩ {query, key}| · D)        (SmolLM2-135M, dynamic:
               30 · (3 · 576² + 2 · 576) = 29,894,400, 22.2% of the base)
    frozen     the fused adapters' own counts, + 1 for the temperature

Pfeiffer, Kamath, Rücklé, Cho, Gurevych, "AdapterFusion: Non-Destructive Task Composition
for Transfer Learning", EACL 2021 (arXiv 2005.00247). AdapterHub: `Fuse`,
`AdapterFusionConfig.load('dynamic')` (our defaults) and `'static'`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method
from additive_jax.peft.bottleneck import Bottleneck, mlp_adapter_input
from additive_jax.peft.frozen import load_frozen
from additive_jax.peft.registry import parse_method

PROJECTIONS = ('query', 'key', 'value')
INITIAL_TEMPERATURE = 50.0          # BertFusion's self.T with temperature
TEMPERATURE_STEP = INITIAL_TEMPERATURE / 1000.0
REGULARIZATION = 0.01               # AdapterHub's get_fusion_regularization_loss


@dataclasses.dataclass(frozen=True)
class Fusion(Method):
  adapters: tuple[str, ...] = ()         # adapter file directories (or, in a config, run folders)
  # their constructor calls (read from them by Fusion.of or the trainer); given alone, with no
  # adapters, the adapters start at their own init: the shapes that counting and restore trace
  adapter_methods: tuple[str, ...] = ()
  projections: tuple[str, ...] = PROJECTIONS
  query_before_ln: bool = False
  residual_before: bool = False
  value_before_softmax: bool = True
  value_initialized: bool = True
  temperature: bool = False
  regularization: bool = True

  key: ClassVar[str] = 'fusion'
  frozen_keys: ClassVar[tuple[str, ...]] = ('adapters', 'temperature')
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 5e-5}  # the paper's (BERT, 10 epochs)

  def __post_init__(self):
    for name in ('adapters', 'adapter_methods', 'projections'):
      value = getattr(self, name)
      value = (value,) if isinstance(value, str) else tuple(value)  # a list: a hashable tuple
      if not all(isinstance(v, str) for v in value):
        raise ValueError(f'Fusion {name} must be a tuple of strings, got {value!r}')
      object.__setattr__(self, name, value)
    unknown = [p for p in self.projections if p not in PROJECTIONS]
    if unknown or len(set(self.projections)) != len(self.projections):
      raise ValueError(f'Fusion projections must be distinct names among {PROJECTIONS}, got '
                       f'{self.projections!r}')
    object.__setattr__(self, 'projections', tuple(p for p in PROJECTIONS if p in self.projections))
    for name in ('query_before_ln', 'residual_before', 'value_before_softmax',
                 'value_initialized', 'temperature', 'regularization'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'Fusion {name} must be True or False, got {getattr(self, name)!r}')
    if self.adapters and self.adapter_methods and len(self.adapters) != len(self.adapter_methods):
      raise ValueError(f'Fusion lists {len(self.adapters)} adapters and {len(self.adapter_methods)} '
                       'adapter_methods; one method per adapter')

  @classmethod
  def of(cls, paths, config, **fields) -> Fusion:
    """The fusion of the adapter file directories `paths` (ours or AdapterHub's, one
    bottleneck adapter each), their methods read from them, checked on the base `config`."""
    methods = tuple(load_frozen(path, config)[0].call_string() for path in paths)
    fusion = cls(adapters=tuple(paths), adapter_methods=methods, **fields)
    fusion.check(config)
    return fusion

  @functools.cached_property
  def fused(self) -> tuple[Bottleneck, ...]:
    """The fused adapters' methods."""
    return tuple(parse_method(call) for call in self.adapter_methods)

  @property
  def sites(self) -> tuple[str, ...]:
    return self.fused[0].sites

  def check(self, config) -> None:
    count = len(self.adapter_methods or self.adapters)
    if count < 2:
      raise ValueError(f'Fusion needs at least 2 adapters to fuse, got {count} '
                       f'(adapters={self.adapters!r})')
    if not self.adapter_methods:
      raise ValueError(f'Fusion(adapters={self.adapters!r}) does not know its adapters\' methods: '
                       'build it with aj.peft.Fusion.of(adapters, config), or train it from a '
                       'config, whose trainer reads them')
    if not self.projections:
      raise ValueError('Fusion projections is empty: with no query, key or value matrix there '
                       'is nothing to train')
    for method in self.fused:
      if type(method) is not Bottleneck or method.gate:
        raise ValueError(f'Fusion fuses ungated bottleneck adapters (Pfeiffer, Houlsby); '
                         f'{method.call_string()} is none')
      method.check(config)
    placements = {m.placement for m in self.fused}
    if len(placements) > 1:
      raise ValueError(f'Fusion adapters must share one placement, got {sorted(placements)}: '
                       f'{", ".join(m.call_string() for m in self.fused)}')
    if placements == {'parallel'}:
      raise ValueError("Fusion of parallel adapters is refused: AdapterHub's Fuse adds the "
                       'residual a second time there (BertFusion, then ParallelAdapter.'
                       'post_forward), which no other implementation computes')

  def num_params(self, config) -> int:
    d, learned = config.hidden_size, len(self.projections)
    biased = len({'query', 'key'} & set(self.projections))
    return len(self.sites) * config.num_layers * (learned * d * d + biased * d)

  def num_frozen_params(self, config) -> int:
    return sum(m.num_params(config) for m in self.fused) + int(self.temperature)

  def frozen_sources(self) -> tuple[str, ...]:
    return self.adapters

  def with_frozen(self, paths, methods) -> Fusion:
    return dataclasses.replace(self, adapters=tuple(paths),
                               adapter_methods=tuple(m.call_string() for m in methods))

  def shape_alike(self) -> Fusion:
    return dataclasses.replace(self, adapters=())  # the adapters' shapes, no file read

  def init_leaves(self, rng, config, params, tokenizer=None):
    layers, d = config.num_layers, config.hidden_size
    adapters_key, fusion_key = jax.random.split(rng)
    tree = {'adapters': self._fused_leaves(adapters_key, config, params)}
    for site, key in zip(self.sites, jax.random.split(fusion_key, len(self.sites))):
      leaves = {}
      for name, part_key in zip(PROJECTIONS, jax.random.split(key, 3)):
        if name not in self.projections:
          continue
        # BertFusion: init_bert_weights, N(0, 0.02²) and zero biases; the value matrix the
        # identity with 1e-6 elsewhere (`value_initialized`), and no bias
        weight = 0.02 * jax.random.normal(part_key, (layers, d, d), jnp.float32)
        if name == 'value' and self.value_initialized:
          weight = jnp.broadcast_to(jnp.where(jnp.eye(d, dtype=bool), 1.0, 1e-6), (layers, d, d))
        leaves[name] = weight.astype(jnp.float32)
        if name != 'value':
          leaves[f'{name}_bias'] = jnp.zeros((layers, d), jnp.float32)
      tree[site] = leaves
    if self.temperature:
      tree['temperature'] = jnp.asarray(INITIAL_TEMPERATURE, jnp.float32)
    return tree

  def _fused_leaves(self, rng, config, params) -> dict:
    """The fused adapters' trees, {'0': ..., '1': ...}: read from `adapters`, or (no paths: the
    shapes for counting and restore) each at its own initial value."""
    if not self.adapters:
      keys = jax.random.split(rng, len(self.fused))
      return {str(n): m.init_leaves(k, config, params) for n, (m, k) in
              enumerate(zip(self.fused, keys))}
    trees = {}
    for n, (path, expected) in enumerate(zip(self.adapters, self.fused)):
      method, tree = load_frozen(path, config)
      if method != expected:
        raise ValueError(f'Fusion adapter {path} holds {method.call_string()}, not the '
                         f'{expected.call_string()} its adapter_methods say')
      trees[str(n)] = tree
    return trees

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'fusion', 'fused_adapters': list(self.adapter_methods),
            **{name: name in self.projections for name in PROJECTIONS},
            'query_before_ln': self.query_before_ln, 'residual_before': self.residual_before,
            'value_before_softmax': self.value_before_softmax, 'temperature': self.temperature,
            'regularization': self.regularization}

  def layer_inputs(self, tree, config):
    """Every leaf per layer; the temperature, one scalar, given to each layer."""
    if 'temperature' not in tree:
      return tree
    return {**tree, 'temperature': jnp.broadcast_to(tree['temperature'], (config.num_layers,))}

  def fuse(self, p, site: str, h_BTD, query_BTD, residual_BTD):
    """Σ_n p_n v_n at one layer's `site` (residual_before: that minus the residual f, so that
    the stream gets r + Σ_n p_n v_n). A: the fused adapters (N is the table's query heads)."""
    dtype = h_BTD.dtype
    u_BTAD = jnp.stack([m.adapter(p['adapters'][str(n)][site], h_BTD)
                        for n, m in enumerate(self.fused)], axis=2)
    if self.residual_before:  # in AdapterHub's one tensor of keys and values: both see it
      u_BTAD = u_BTAD + residual_BTD[:, :, None, :]
    w = {name: leaf.astype(dtype) for name, leaf in p[site].items()}
    q_BTD = query_BTD
    if 'query' in w:
      q_BTD = jnp.einsum('btd,de->bte', query_BTD, w['query']) + w['query_bias']
    k_BTAD = u_BTAD
    if 'key' in w:
      k_BTAD = jnp.einsum('btad,de->btae', u_BTAD, w['key']) + w['key_bias']
    v_BTAD = u_BTAD
    if 'value' in w and self.value_before_softmax:
      v_BTAD = jnp.einsum('btad,de->btae', u_BTAD, w['value'])
    scores_BTA = jnp.einsum('btd,btad->bta', q_BTD, k_BTAD).astype(jnp.float32)
    if self.temperature:
      scores_BTA = scores_BTA / p['temperature']
    probs_BTA = jax.nn.softmax(scores_BTA, axis=-1).astype(dtype)
    out_BTD = jnp.einsum('bta,btad->btd', probs_BTA, v_BTAD)
    if 'value' in w and not self.value_before_softmax:
      out_BTD = jnp.einsum('btd,de->bte', out_BTD, w['value'])
    return out_BTD - residual_BTD if self.residual_before else out_BTD

  def attn_delta(self, p, r, f):
    if 'attn' in self.sites:
      return self.fuse(p, 'attn', f, f, f)
    return None

  def mlp_delta(self, p, r, f):
    placement = self.fused[0].placement
    h = mlp_adapter_input(placement, r, f)
    query = f if placement == 'houlsby' or self.query_before_ln else h
    return self.fuse(p, 'mlp', h, query, f)

  def after_step(self, tree, step):
    """The temperature at `step` (the next step's): T_s = max(50 − 0.05·s, 1)."""
    if not self.temperature:
      return tree
    value = jnp.maximum(INITIAL_TEMPERATURE - TEMPERATURE_STEP * step, 1.0)
    return {**tree, 'temperature': value.astype(jnp.float32)}

  def extra_loss(self, tree, step):
    """0.01 · Σ ‖I − W_v‖²_F over every layer and site, from the second step on; None
    without a value matrix or with `regularization=False`."""
    if not (self.regularization and 'value' in self.projections):
      return None
    eye = jnp.eye(tree[self.sites[0]]['value'].shape[-1], dtype=jnp.float32)
    total = sum(jnp.sum((eye - tree[site]['value']) ** 2) for site in self.sites)
    return jnp.where(step > 0, REGULARIZATION * total, 0.0)
