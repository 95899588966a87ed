"""Bottleneck adapters: a small down → act → up module added to the residual stream.

Each adapter maps a hidden state h (width D) through a bottleneck of width R:

    A(h) = W_up · act(W_down · h + b_down) + b_up        W_down: [D, R], W_up: [R, D]

and its (scaled) output is added to the stream. Where it reads and where it adds
is the placement; with r the stream before a sublayer and f that sublayer's
output (pre-norm block: x = r + f), the three placements of AdapterHub on Llama:

    'pfeiffer'  after the MLP                    x = r + f + s·A(r + f)    (AdapterHub seq_bn)
    'houlsby'   after attention and after MLP    x = r + f + s·A(f)        (double_seq_bn; 2 per layer)
    'parallel'  beside the MLP, reading r        x = r + f + s·A(r)        (par_bn)

`act` is relu, gelu (erf-based, exact, as PyTorch's and AdapterHub's "gelu") or
silu (AdapterHub's "swish"). The scale s multiplies the adapter output at every
placement, as AdapterHub's `scaling` does (`up = up * self.scaling` in
`Adapter.forward` and `ParallelAdapter.forward`); AdapterHub's defaults are
s = 1 for seq_bn/double_seq_bn and s = 4 for par_bn, ours s = 1 everywhere.

Width: `dim=R`, or `reduction_factor=rf` with R = int(D // rf) as AdapterHub.

Parameters: per adapter 2·D·R + R + D; L of them for pfeiffer and parallel, 2·L
for houlsby (Llama-3.2-1B, R = 64, pfeiffer: 16 · (2·2048·64 + 64 + 2048) = 4,228,096).

Initialization. W_up and b_up are zero so the adapter is the identity at init
(as AdapterHub's par_bn, "mam_adapter" init; its seq_bn and double_seq_bn use
"bert" init, which also draws W_up from N(0, 0.02): we deviate there so that
every method starts as the identity). W_down is drawn as AdapterHub does for that
placement: N(0, 0.02) ("bert") for pfeiffer and houlsby; kaiming-uniform with
a = √5, i.e. U(±1/√D) ("mam_adapter") for parallel. b_down = 0.

With `gate` (UniPELT, peft/gate.py) each adapter's output is scaled by a learned
gate on the adapter's input, g(h) · s · A(h), as AdapterHub's `use_gating`
(methods/modeling.py:219-223): D + 1 more parameters an adapter.

Leaves (fp32, leading layers axis): {'mlp': {'down': [L,D,R], 'down_bias': [L,R],
'up': [L,R,D], 'up_bias': [L,D]}}, plus the same under 'attn' for houlsby (and
'gate' [L,D], 'gate_bias' [L] with a gate).

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019;
Pfeiffer et al., "AdapterFusion", EACL 2021 (arXiv 2005.00247, 2020);
He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning",
ICLR 2022. AdapterHub (`adapters`): SeqBnConfig, DoubleSeqBnConfig, ParBnConfig
with `reduction_factor`, `non_linearity`, `scaling`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_number, require_positive_int
from additive_jax.peft.gate import gate_leaves, gate_values, require_gate

PLACEMENTS = ('pfeiffer', 'houlsby', 'parallel')
# each placement as our adapter file names it for a reader
FILE_PLACEMENTS = {'pfeiffer': 'after_ffn', 'houlsby': 'after_attn_and_ffn',
                   'parallel': 'parallel_to_ffn'}
ACTIVATIONS = {'relu': jax.nn.relu,
               'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # erf-based, as torch's
               'silu': jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class Bottleneck(Method):
  dim: int | None = None
  placement: str = 'pfeiffer'
  activation: str = 'relu'
  scale: float = 1.0
  reduction_factor: float | None = None
  gate: str = ''

  key: ClassVar[str] = 'bottleneck'
  presets: ClassVar[dict] = {'pfeiffer': {'dim': 64, 'placement': 'pfeiffer'},
                             'houlsby': {'dim': 32, 'placement': 'houlsby'},
                             'parallel': {'dim': 64, 'placement': 'parallel', 'scale': 4.0}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 1e-3}

  def __post_init__(self):
    require_placement_and_activation('Bottleneck', self.placement, self.activation)
    if (self.dim is None) == (self.reduction_factor is None):
      raise ValueError('Bottleneck takes exactly one of dim and reduction_factor, got '
                       f'dim={self.dim!r}, reduction_factor={self.reduction_factor!r}')
    if self.dim is not None:
      require_positive_int('Bottleneck', 'dim', self.dim)
    rf = self.reduction_factor
    if rf is not None and (isinstance(rf, bool) or not isinstance(rf, numbers.Real) or not rf > 0):
      raise ValueError(f'Bottleneck reduction_factor must be a positive number, got {rf!r}')
    require_number('Bottleneck', 'scale', self.scale)
    require_gate('Bottleneck', self.gate)

  @property
  def causal(self) -> bool:
    return self.gate != 'sequence'

  @property
  def sites(self) -> tuple[str, ...]:
    """The subtrees: one adapter per layer after the MLP, and one after attention for houlsby."""
    return ('attn', 'mlp') if self.placement == 'houlsby' else ('mlp',)

  def bottleneck_dim(self, config) -> int:
    """R: `dim`, or int(D // reduction_factor) as AdapterHub computes its `down_sample`."""
    if self.dim is not None:
      return self.dim
    return int(config.hidden_size // self.reduction_factor)

  def check(self, config) -> None:
    dim, width = self.bottleneck_dim(config), config.hidden_size
    if self.dim is not None and dim > width:
      raise ValueError(f'Bottleneck dim={dim} exceeds the hidden size {width}; a bottleneck '
                       'must not be wider than the stream it reads')
    if self.reduction_factor is not None and not 1 <= dim <= width:
      raise ValueError(f'Bottleneck reduction_factor={self.reduction_factor!r} gives a bottleneck '
                       f'of int({width} // {self.reduction_factor!r}) = {dim}; it must lie in '
                       f'1…{width}')

  def num_params(self, config) -> int:
    d, r = config.hidden_size, self.bottleneck_dim(config)
    gate = d + 1 if self.gate else 0
    return len(self.sites) * config.num_layers * (2 * d * r + r + d + gate)

  def init_leaves(self, rng, config, params, tokenizer=None):
    layers, d, r = config.num_layers, config.hidden_size, self.bottleneck_dim(config)
    tree = {}
    for site, key in zip(self.sites, jax.random.split(rng, len(self.sites))):
      if self.gate:  # only then: an ungated adapter draws exactly what it drew before gates
        key, gate_key = jax.random.split(key)
      if self.placement == 'parallel':  # AdapterHub "mam_adapter": kaiming_uniform_(a=√5)
        bound = 1.0 / d ** 0.5
        down_LDR = jax.random.uniform(key, (layers, d, r), jnp.float32, -bound, bound)
      else:                             # AdapterHub "bert": N(0, 0.02)
        down_LDR = 0.02 * jax.random.normal(key, (layers, d, r), jnp.float32)
      tree[site] = {'down': down_LDR,
                    'down_bias': jnp.zeros((layers, r), jnp.float32),
                    'up': jnp.zeros((layers, r, d), jnp.float32),  # zero: the identity at init
                    'up_bias': jnp.zeros((layers, d), jnp.float32)}
      if self.gate:  # AdapterHub's init_bert_weights: N(0, 0.02²), a zero bias
        tree[site].update(gate_leaves(gate_key, layers, d, 'zero'))
    return tree

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'bottleneck', 'bottleneck_dim': self.bottleneck_dim(config),
            'non_linearity': self.activation, 'adapter_placement': FILE_PLACEMENTS[self.placement],
            'scaling': self.scale, 'num_layers': config.num_layers,
            **({'gate': self.gate} if self.gate else {})}

  def stack_with(self, others, config) -> Bottleneck:
    """The same placement, activation and scale at the largest bottleneck dim."""
    other = next((m for m in others if (m.placement, m.activation, m.scale, m.gate) !=
                  (self.placement, self.activation, self.scale, self.gate)), None)
    if other is not None:
      raise ValueError(f'{self.call_string()} and {other.call_string()} cannot share a stack: '
                       'their placement, activation, scale or gate differ')
    dim = max(m.bottleneck_dim(config) for m in (self, *others))
    return dataclasses.replace(self, dim=dim, reduction_factor=None)

  def widen(self, tree, wide: Bottleneck, config):
    """The extra units zero in and out: act(0) = 0 and their rows of W_up are zero, exactly."""
    pad = wide.bottleneck_dim(config) - self.bottleneck_dim(config)
    return {site: {**p, 'down': jnp.pad(p['down'], ((0, 0), (0, 0), (0, pad))),
                   'down_bias': jnp.pad(p['down_bias'], ((0, 0), (0, pad))),
                   'up': jnp.pad(p['up'], ((0, 0), (0, pad), (0, 0))),
                   'up_bias': p['up_bias']} for site, p in tree.items()}

  def adapter(self, p, h_BTD):
    """s · A(h) for one layer's leaves `p` (down [D,R], down_bias [R], up [R,D], up_bias [D]),
    times its gate g(h) with one."""
    out_BTD = adapter_output(p, h_BTD, self.activation, self.scale)
    return out_BTD * gate_values(p, h_BTD, self.gate) if self.gate else out_BTD

  def attn_delta(self, p, r, f):
    if self.placement == 'houlsby':
      return self.adapter(p['attn'], f)
    return None

  def mlp_delta(self, p, r, f):
    return self.adapter(p['mlp'], mlp_adapter_input(self.placement, r, f))


def require_placement_and_activation(method: str, placement, activation) -> None:
  """A placement of PLACEMENTS and an activation of ACTIVATIONS (Compacter shares them)."""
  if placement not in PLACEMENTS:
    raise ValueError(f'{method} placement must be one of {PLACEMENTS}, got {placement!r}')
  if activation not in ACTIVATIONS:
    raise ValueError(f'{method} activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}')


def adapter_output(p, h_BTD, activation: str, scale: float):
  """s · A(h) for one layer's matrices `p` (down [D,R], up [R,D]) and biases (down_bias [R],
  up_bias [D]; a method without them leaves them out). Compacter shares it."""
  dtype = h_BTD.dtype  # the model's compute dtype; the leaves stay fp32 in storage
  z_BTR = jnp.einsum('btd,dr->btr', h_BTD, p['down'].astype(dtype))
  if 'down_bias' in p:
    z_BTR = z_BTR + p['down_bias'].astype(dtype)
  z_BTR = ACTIVATIONS[activation](z_BTR)
  out_BTD = jnp.einsum('btr,rd->btd', z_BTR, p['up'].astype(dtype))
  if 'up_bias' in p:
    out_BTD = out_BTD + p['up_bias'].astype(dtype)
  return out_BTD * jnp.asarray(scale, dtype)


def mlp_adapter_input(placement: str, r, f):
  """What the adapter at the MLP reads: r + f (pfeiffer), f (houlsby), r (parallel: the stream
  before the MLP)."""
  if placement == 'pfeiffer':
    return r + f
  return f if placement == 'houlsby' else r
