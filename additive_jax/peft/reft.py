"""ReFT: a low-rank intervention on the hidden state at a sequence's first and last tokens.

After each chosen layer, at the first `prefix_positions` and the last `suffix_positions`
real tokens of every sequence, the layer's output h (width D) is replaced by

    LoReFT  Φ(h) = h + Rᵀ(act(W h + b) − R h)     R: [r, D] with orthonormal rows
    NoReFT  the same formula, R unconstrained
    DiReFT  Φ(h) = h + Rᵀ act(W h + b)             R unconstrained, nothing subtracted

with W: [r, D], b: [r] and act the identity unless `activation` names one. The prefix
positions have their own (W, b, R), the suffix positions theirs (`tied=True`: one for
both); where the two windows overlap (a sequence shorter than p + s) the suffix's wins,
as in AdapterHub. Every other position is left as it is.

Positions. Counted among a sequence's real tokens, so a left-padded row, a packed segment
and a row alone get the same ones (model/context.py): the prefix is the tokens of index
< p, the suffix the last s tokens of the call. Decoding with a KV cache, the prefill
is the prompt: its first p and last s tokens are intervened; a generated token is
intervened only if its index is < p (a prompt shorter than p), never as a suffix: it
follows the prompt. So with suffix_positions = 0 every cached step equals the uncached
forward over the whole sequence; with a suffix, the first step does, and later steps
equal an uncached forward that intervenes at the prompt's last s tokens. (AdapterHub
recomputes its positions from each call's input: in a one-token step it intervenes on the
new token as position 0 of a prefix, and its suffix indices fall outside the step's one
token. In training over prompt + answer, AdapterHub's and our suffix is the answer's end.)

The orthonormal R of LoReFT is torch's `parametrizations.orthogonal` of an [r, D] weight
(the map AdapterHub trains through), kept as its free parameter X = `original` [r, D]:
with A the strictly lower part of Xᵀ [D, r], τ_j = 2 / (1 + ‖A_j‖²) and the Householder
vectors v_j = e_j + A_j,  Rᵀ = H_0 ⋯ H_{r−1} I[:, :r] · diag(sign X_jj),  H_j = I − τ_j v_j v_jᵀ.
(torch truncates X_jj to an integer where we take its sign: the same for the ±1 it holds;
the diagonal gets no gradient, and weight decay, which would shrink it, cannot zero a row.)
AdapterHub also keeps torch's trivialization `base`, a frozen D×D orthogonal matrix, and
uses base · Rᵀ: reading its file folds base into X (adapter files/adapterhub_reft.py), so
the leaves hold no D×D matrix; writing one writes base = I.

Initialization, each the identity (AdapterHub's is not: nn.Linear's init for W, b): LoReFT
X with N(0, 1) below the diagonal and 1 on it (a product of r random reflections), W = R,
b = 0; NoReFT R ~ U(±1/√D) (nn.Linear's), W = R, b = 0; DiReFT the same R, W = 0, b = 0.

Parameters: n · u · (2·D·r + r), n the chosen layers, u = 1 (tied) or 2 (Llama-3.2-1B,
r = 4, all 16 layers, untied: 16 · 2 · (2·2048·4 + 4) = 524,416).

Leaves (fp32, leading axis the chosen layers, then the unit: prefix, suffix):
{'source_kernel': [n, u, D, r], 'source_bias': [n, u, r], and 'original' [n, u, r, D]
(LoReFT) or 'projection' [n, u, r, D] (NoReFT, DiReFT)}.

No dropout: AdapterHub's LoReftConfig drops 5% of the intervened hidden state in training
(`dropout=0.05`); like every method here, ReFT trains without dropout.

Wu, Arora, Wang, Geiger, Jurafsky, Manning & Potts, "ReFT: Representation Finetuning for
Language Models", NeurIPS 2024 (arXiv 2404.03592). AdapterHub (`adapters`): LoReftConfig,
NoReftConfig, DiReftConfig (`r`, `layers`, `prefix_positions`, `suffix_positions`,
`tied_weights`, `orthogonality`, `subtract_projection`, `non_linearity`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_positive_int
from additive_jax.peft.bottleneck import ACTIVATIONS

KINDS = ('loreft', 'noreft', 'direft')  # (orthogonal R, subtract R h)
ORTHOGONAL = {'loreft': True, 'noreft': False, 'direft': False}
SUBTRACT = {'loreft': True, 'noreft': True, 'direft': False}


def orthonormal_rows(original_rD):
  """R [..., r, D] with orthonormal rows from torch's householder parametrization's free
  parameter X [..., r, D] (the module docstring's formula; torch's `_Orthogonal.forward`
  without a base)."""
  x_Dr = jnp.swapaxes(original_rD, -1, -2)
  d, r = x_Dr.shape[-2:]
  lower_Dr = jnp.tril(x_Dr, -1)
  tau_r = 2.0 / (1.0 + jnp.sum(lower_Dr * lower_Dr, axis=-2))
  q_Dr = jnp.broadcast_to(jnp.eye(d, r, dtype=x_Dr.dtype), x_Dr.shape)
  for j in reversed(range(r)):  # Q ← H_j Q, from the last reflector to the first
    v_D = lower_Dr[..., :, j] + jnp.eye(d, dtype=x_Dr.dtype)[j]
    vq_r = jnp.einsum('...d,...dr->...r', v_D, q_Dr)
    q_Dr = q_Dr - tau_r[..., j, None, None] * v_D[..., :, None] * vq_r[..., None, :]
  signs_r = jnp.sign(jnp.diagonal(x_Dr, axis1=-2, axis2=-1))
  return jnp.swapaxes(q_Dr * signs_r[..., None, :], -1, -2)


@dataclasses.dataclass(frozen=True)
class ReFT(Method):
  """`ReFT(rank, layers=None, prefix_positions=3, suffix_positions=0, kind='loreft', tied=False,
  activation=None)`; `layers=None` is every layer (AdapterHub's "all")."""
  rank: int = 1
  layers: tuple[int, ...] | None = None
  prefix_positions: int = 3
  suffix_positions: int = 0
  kind: str = 'loreft'
  tied: bool = False
  activation: str | None = None

  key: ClassVar[str] = 'reft'
  wants_token_order: ClassVar[bool] = True
  # the prompt's first 7 tokens, rank 4 (the paper's instruction-tuning settings intervene
  # at the first and last 7; here training reads prompt + answer, whose last tokens are the
  # answer's, so the presets take the prefix alone)
  presets: ClassVar[dict] = {'loreft': {'rank': 4, 'prefix_positions': 7, 'kind': 'loreft'},
                             'direft': {'rank': 4, 'prefix_positions': 7, 'kind': 'direft'}}
  # pyreft's README example (LoReFT rank 4 on a Llama: AdamW, learning rate 4e-3)
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 4e-3}

  def __post_init__(self):
    require_positive_int('ReFT', 'rank', self.rank)
    for name in ('prefix_positions', 'suffix_positions'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'ReFT {name} must be a whole number >= 0, got {value!r}')
    if not self.prefix_positions and not self.suffix_positions:
      raise ValueError('ReFT needs prefix_positions or suffix_positions > 0: it intervenes '
                       'nowhere else')
    if self.kind not in KINDS:
      raise ValueError(f'ReFT kind must be one of {KINDS}, got {self.kind!r}')
    if not isinstance(self.tied, bool):
      raise ValueError(f'ReFT tied must be True or False, got {self.tied!r}')
    if self.activation is not None and self.activation not in ACTIVATIONS:
      raise ValueError(f'ReFT activation must be None or one of {tuple(ACTIVATIONS)}, '
                       f'got {self.activation!r}')
    if self.layers is not None:
      layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
      if (not layers or len(set(layers)) != len(layers)
          or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)):
        raise ValueError(f'ReFT layers must be None (every layer) or distinct layer indices '
                         f'>= 0, got {self.layers!r}')
      object.__setattr__(self, 'layers', tuple(sorted(layers)))  # a list becomes a tuple

  @property
  def units(self) -> int:
    return 1 if self.tied else 2

  def chosen_layers(self, config) -> tuple[int, ...]:
    return tuple(range(config.num_layers)) if self.layers is None else self.layers

  def check(self, config) -> None:
    if self.layers is not None and self.layers[-1] >= config.num_layers:
      raise ValueError(f'ReFT layers={self.layers} names layer {self.layers[-1]}; the model has '
                       f'{config.num_layers} (0…{config.num_layers - 1})')
    if self.rank > config.hidden_size:
      raise ValueError(f'ReFT rank={self.rank} exceeds the hidden size {config.hidden_size}')

  def num_params(self, config) -> int:
    d, r = config.hidden_size, self.rank
    return len(self.chosen_layers(config)) * self.units * (2 * d * r + r)

  def token_matmul_params(self, config) -> int:
    return 0  # it multiplies p + s tokens' states a sequence, not every token's

  def init_leaves(self, rng, config, params, tokenizer=None):
    n, u, d, r = len(self.chosen_layers(config)), self.units, config.hidden_size, self.rank
    if ORTHOGONAL[self.kind]:
      x_Dr = jnp.tril(jax.random.normal(rng, (n, u, d, r), jnp.float32), -1) + jnp.eye(d, r)
      original = jnp.swapaxes(x_Dr, -1, -2)
      leaves = {'original': original}
      projection = orthonormal_rows(original)
    else:
      bound = 1.0 / d ** 0.5  # nn.Linear's kaiming_uniform_(a=√5)
      projection = jax.random.uniform(rng, (n, u, r, d), jnp.float32, -bound, bound)
      leaves = {'projection': projection}
    kernel = (jnp.zeros((n, u, d, r), jnp.float32) if not SUBTRACT[self.kind]
              else jnp.swapaxes(projection, -1, -2))  # W = R: act(Rh) − Rh = 0
    return {'source_kernel': kernel, 'source_bias': jnp.zeros((n, u, r), jnp.float32), **leaves}

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'reft', 'r': self.rank, 'layers': list(self.chosen_layers(config)),
            'prefix_positions': self.prefix_positions, 'suffix_positions': self.suffix_positions,
            'orthogonality': ORTHOGONAL[self.kind], 'subtract_projection': SUBTRACT[self.kind],
            'tied_weights': self.tied, 'non_linearity': self.activation,
            'num_layers': config.num_layers}

  def projection_matrix(self, tree):
    """R [n, u, r, D] of the leaves."""
    if ORTHOGONAL[self.kind]:
      return orthonormal_rows(tree['original'])
    return tree['projection']

  def fold(self, tree, config):
    """LoReFT as NoReFT with R evaluated once: the same formula, no parametrization to run."""
    if not ORTHOGONAL[self.kind]:
      return self, tree
    return dataclasses.replace(self, kind='noreft'), {
        'source_kernel': tree['source_kernel'], 'source_bias': tree['source_bias'],
        'projection': orthonormal_rows(tree['original'])}

  def stack_with(self, others, config) -> ReFT:
    """The same layers, positions, kind, tying and activation at the largest rank."""
    other = next((m for m in others if dataclasses.replace(m, rank=self.rank) != self), None)
    if other is not None:
      raise ValueError(f'{self.call_string()} and {other.call_string()} cannot share a stack: '
                       'they intervene at different layers or positions, or compute another form')
    if ORTHOGONAL[self.kind]:
      raise ValueError(f'{self.call_string()} stacks in its inference form (aj.peft.stack folds '
                       "it to kind='noreft' first)")
    return dataclasses.replace(self, rank=max(m.rank for m in (self, *others)))

  def widen(self, tree, wide: ReFT, config):
    """Zero rows of W, b and R: act(0) − 0 = 0 for every activation here, exactly."""
    pad = wide.rank - self.rank
    return {'source_kernel': jnp.pad(tree['source_kernel'], ((0, 0),) * 3 + ((0, pad),)),
            'source_bias': jnp.pad(tree['source_bias'], ((0, 0),) * 2 + ((0, pad),)),
            'projection': jnp.pad(tree['projection'], ((0, 0),) * 2 + ((0, pad), (0, 0)))}

  def layer_inputs(self, tree, config):
    """Every layer's leaves (zero, and inactive, at a layer not chosen): the scan's input."""
    leaves = {'kernel': tree['source_kernel'], 'bias': tree['source_bias'],
              'projection': self.projection_matrix(tree)}
    layers = jnp.asarray(self.chosen_layers(config))
    active = jnp.zeros((config.num_layers,), bool).at[layers].set(True)
    if self.layers is None:
      return {**leaves, 'active': active}
    def scatter(x):
      return jnp.zeros((config.num_layers,) + x.shape[1:], x.dtype).at[layers].set(x)
    return {**jax.tree.map(scatter, leaves), 'active': active}

  def intervene(self, p, unit: int, h_BTD):
    """Φ(h) with unit `unit`'s W, b, R of one layer."""
    dtype = h_BTD.dtype
    kernel_DR = p['kernel'][unit].astype(dtype)
    projection_RD = p['projection'][unit].astype(dtype)
    source_BTR = jnp.einsum('btd,dr->btr', h_BTD, kernel_DR) + p['bias'][unit].astype(dtype)
    if self.activation is not None:
      source_BTR = ACTIVATIONS[self.activation](source_BTR)
    if SUBTRACT[self.kind]:
      # as the source is computed, so that W = R gives exactly zero (the identity at init)
      source_BTR = source_BTR - jnp.einsum('btd,dr->btr', h_BTD, projection_RD.T)
    return h_BTD + jnp.einsum('btr,rd->btd', source_BTR, projection_RD)

  def layer_output(self, p, x_BTD, ctx):
    out_BTD = x_BTD
    index_BT, after_BT = ctx.token_index_BT, ctx.tokens_after_BT
    if self.prefix_positions:
      prefix_BT = (index_BT >= 0) & (index_BT < self.prefix_positions)
      out_BTD = jnp.where(prefix_BT[..., None], self.intervene(p, 0, x_BTD), out_BTD)
    if self.suffix_positions and after_BT is not None:
      suffix_BT = after_BT < self.suffix_positions
      out_BTD = jnp.where(suffix_BT[..., None], self.intervene(p, self.units - 1, x_BTD), out_BTD)
    return jnp.where(p['active'], out_BTD, x_BTD)
