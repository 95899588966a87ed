"""Compacter and Compacter++: bottleneck adapters whose matrices are sums of Kronecker products.

A Compacter adapter is a bottleneck adapter (bottleneck.py: the same placements,
activations and scale s)

    A(h) = act(h·H_down + b_down)·H_up + b_up          H_down: [D, R], H_up: [R, D]

whose two matrices are parameterized hypercomplex multiplications (PHM), n = phm_dim:

    H = Σ_{c=1..n} A_c ⊗ W_c          A_c: [n, n] (a "rule"),  W_c: [I/n, O/n]
    W_c = W_left_c · W_right_c        W_left_c: [I/n, k],  W_right_c: [k, O/n]  (k = phm_rank)

for a projection of I inputs and O outputs (down: D → R, up: R → D), i.e.
H[a·I/n + u, b·O/n + y] = Σ_c A_c[a, b]·W_c[u, y]. With `shared_phm_rule` one rule
tensor [n, n, n] serves every projection of every adapter (the paper's "slow" weights);
otherwise each projection has its own. `factorized_phm_rule` makes each A_c an outer
product of two n-vectors; `factorized_phm_W=False` makes W_c a full [I/n, O/n] matrix;
`shared_W_phm` shares the W of each projection across layers and sites (factorized only:
AdapterHub cannot build the unfactorized one, see docs/adapter_files.md).
R = int(D // reduction_factor) as AdapterHub computes it; n must divide D and R.

Compacter is the Houlsby placement (AdapterHub `CompacterConfig`, a double_seq_bn: two
adapters a layer), Compacter++ the Pfeiffer one (`CompacterPlusPlusConfig`, a seq_bn:
after the MLP only); both gelu (exact), reduction factor 32, n = 4, k = 1, one shared
unfactorized rule. The presets take reduction factor 16: SmolLM2's D = 576 gives
int(576 // 32) = 18, which n = 4 does not divide; 16 gives 36 there, and a multiple of 4
on every Llama 3 width.

Parameters, for S adapters a layer (2 for houlsby, else 1) over L layers:
  W       k·(I + O) a projection, 2·k·(D + R) an adapter (I·O/n a projection unfactorized);
          once in all, not per adapter, with shared_W_phm
  biases  R + D an adapter (phm_bias)
  rules   n³ a projection (2·n² factorized); once in all when shared
At the defaults S·L·(2·k·(D + R) + R + D) + n³ (Llama-3.2-1B, R = 64, Compacter:
2·16·(2·(2048 + 64) + 64 + 2048) + 64 = 202,816).

Initialization. Each W_c (or W_left_c and W_right_c) is xavier-normal, std √(2/(a + b))
for an [a, b] slice, as AdapterHub draws it whatever `hypercomplex_nonlinearity` says
(`init_W` tests the string for truth, not its value); biases zero. Two deviations from
AdapterHub (`init_shared_parameters`, `PHMLayer.reset_parameters`):
  * the up projection's W_right (W unfactorized) is zero, so H_up = 0 and the adapter is
    the identity at init, as every method here starts; AdapterHub's stays random, so its
    Compacter changes the logits before any training;
  * every rule is N(0, 1/n²) (each factor of a factorized one N(0, 1/n)), which with an
    unfactorized W gives H xavier's variance, where AdapterHub draws a shared rule with
    std 10⁻⁴ (phm_init_range) and a projection's own with 0.01. With H_up zero, its scale
    would leave every gradient but the biases' near 10⁻⁸ of the loss's (the rule enters
    both projections, so a gradient carries it twice), under Adam's epsilon: on SmolLM2 (the presets, 20 steps of 4×64
    SST-2 tokens at 3e-3) the loss went 4.39 → 3.24 (Compacter) and → 3.46 (Compacter++)
    at AdapterHub's scale, → 2.89 and → 2.86 at this one.

Leaves (fp32), per site ('attn' for houlsby, 'mlp') and projection ('down', 'up'), with a
leading layers axis: 'w_left' [L,n,I/n,k] and 'w_right' [L,n,k,O/n] (or 'w' [L,n,I/n,O/n]),
'bias' [L,O], and unless shared 'rule' [L,n,n,n] (or 'rule_left' [L,n,n,1] and
'rule_right' [L,n,1,n]); what is shared, without the layers axis, under 'shared': the
rule leaves, and {'down': {'w_left', 'w_right'}, 'up': {...}}. Each is an AdapterHub
tensor in its own layout (files/adapterhub_compacter.py). `layer_inputs` builds every
layer's H once a call, outside the layer scan; the blocks apply them as bottleneck.py does.
Shape letters beyond llama.py's table: C = n, Q = k, I and O a projection's widths (as in
lora.py), U = I/n, Y = O/n.

Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", NeurIPS 2021 (arXiv 2106.04647). AdapterHub (`adapters`): CompacterConfig,
CompacterPlusPlusConfig and BnConfig's phm_* fields.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method, require_number, require_positive_int
from additive_jax.peft.bottleneck import (FILE_PLACEMENTS, adapter_output, mlp_adapter_input,
                                          require_placement_and_activation)

PROJECTIONS = ('down', 'up')
# the fields that must agree for adapters to share a stack; width and rank may differ
STACK_FIELDS = ('placement', 'activation', 'scale', 'phm_dim', 'shared_phm_rule',
                'factorized_phm_rule', 'factorized_phm_W', 'shared_W_phm', 'phm_bias')
HIGHEST = jax.lax.Precision.HIGHEST  # H is built in fp32: no bf16 passes on an accelerator


@dataclasses.dataclass(frozen=True)
class Compacter(Method):
  reduction_factor: float = 32
  phm_dim: int = 4
  shared_phm_rule: bool = True
  factorized_phm_rule: bool = False
  phm_rank: int = 1
  placement: str = 'houlsby'
  activation: str = 'gelu'
  scale: float = 1.0
  factorized_phm_W: bool = True
  shared_W_phm: bool = False
  phm_bias: bool = True

  key: ClassVar[str] = 'compacter'
  presets: ClassVar[dict] = {'compacter': {'reduction_factor': 16, 'placement': 'houlsby'},
                             'compacterpp': {'reduction_factor': 16, 'placement': 'pfeiffer'}}
  # The authors' configs (github.com/rabeehk/compacter seq2seq/configs/compacter.json and
  # compacter++.json, T5-base on GLUE): learning_rate 3e-3.
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 3e-3}

  def __post_init__(self):
    require_placement_and_activation('Compacter', self.placement, self.activation)
    rf = self.reduction_factor
    if isinstance(rf, bool) or not isinstance(rf, numbers.Real) or not rf > 0:
      raise ValueError(f'Compacter reduction_factor must be a positive number, got {rf!r}')
    require_positive_int('Compacter', 'phm_dim', self.phm_dim)
    require_positive_int('Compacter', 'phm_rank', self.phm_rank)
    require_number('Compacter', 'scale', self.scale)
    for name in ('shared_phm_rule', 'factorized_phm_rule', 'factorized_phm_W', 'shared_W_phm',
                 'phm_bias'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'Compacter {name} must be True or False, got {getattr(self, name)!r}')
    if self.shared_W_phm and not self.factorized_phm_W:
      raise ValueError('Compacter shared_W_phm=True needs factorized_phm_W=True: AdapterHub '
                       'cannot build a shared unfactorized W (init_shared_parameters reads an '
                       'unassigned _in_feats_per_axis), so no such adapter exists to match')

  @property
  def sites(self) -> tuple[str, ...]:
    return ('attn', 'mlp') if self.placement == 'houlsby' else ('mlp',)

  def bottleneck_dim(self, config) -> int:
    """R = int(D // reduction_factor), AdapterHub's `down_sample`."""
    return int(config.hidden_size // self.reduction_factor)

  def widths(self, config) -> dict[str, tuple[int, int]]:
    d, r = config.hidden_size, self.bottleneck_dim(config)
    return {'down': (d, r), 'up': (r, d)}

  def check(self, config) -> None:
    d, r, n = config.hidden_size, self.bottleneck_dim(config), self.phm_dim
    if not 1 <= r <= d:
      raise ValueError(f'Compacter reduction_factor={self.reduction_factor!r} gives a bottleneck '
                       f'of int({d} // {self.reduction_factor!r}) = {r}; it must lie in 1…{d}')
    if d % n or r % n:
      raise ValueError(f'Compacter phm_dim={n} must divide the hidden size {d} and the bottleneck '
                       f'int({d} // {self.reduction_factor!r}) = {r} (AdapterHub asserts the '
                       'same); choose another reduction_factor or phm_dim')

  def weight_shapes(self, i: int, o: int) -> dict[str, tuple[int, ...]]:
    """The W leaves of one projection of `i` inputs and `o` outputs, without the layers axis."""
    n, k = self.phm_dim, self.phm_rank
    if self.factorized_phm_W:
      return {'w_left': (n, i // n, k), 'w_right': (n, k, o // n)}
    return {'w': (n, i // n, o // n)}

  def rule_shapes(self) -> dict[str, tuple[int, ...]]:
    n = self.phm_dim
    if self.factorized_phm_rule:
      return {'rule_left': (n, n, 1), 'rule_right': (n, 1, n)}
    return {'rule': (n, n, n)}

  def num_params(self, config) -> int:
    d, r, n, k = config.hidden_size, self.bottleneck_dim(config), self.phm_dim, self.phm_rank
    weights = 2 * k * (d + r) if self.factorized_phm_W else 2 * d * r // n
    rule = 2 * n * n if self.factorized_phm_rule else n ** 3
    per_adapter = ((0 if self.shared_W_phm else weights) + (r + d if self.phm_bias else 0) +
                   (0 if self.shared_phm_rule else 2 * rule))
    shared = (rule if self.shared_phm_rule else 0) + (weights if self.shared_W_phm else 0)
    return len(self.sites) * config.num_layers * per_adapter + shared

  def token_matmul_params(self, config) -> int:
    """Every token multiplies the built matrices H (D·R each), not the factors."""
    return len(self.sites) * config.num_layers * 2 * config.hidden_size * self.bottleneck_dim(config)

  def init_leaves(self, rng, config, params, tokenizer=None):
    keys = iter(jax.random.split(rng, 64))  # more than any setting draws (at most 22)

    def normal(shape, std):
      return std * jax.random.normal(next(keys), shape, jnp.float32)

    def weights(lead, projection):
      leaves = {}
      for name, shape in self.weight_shapes(*self.widths(config)[projection]).items():
        if projection == 'up' and name in ('w_right', 'w'):  # zero: the identity at init
          leaves[name] = jnp.zeros(lead + shape, jnp.float32)
        else:  # xavier-normal over each [a, b] slice
          leaves[name] = normal(lead + shape, (2 / (shape[-2] + shape[-1])) ** 0.5)
      return leaves

    def rules(lead):  # std 1/n, or 1/√n for each of two factors
      std = self.phm_dim ** (-0.5 if self.factorized_phm_rule else -1.0)
      return {name: normal(lead + shape, std) for name, shape in self.rule_shapes().items()}

    layers, tree, shared = (config.num_layers,), {}, {}
    if self.shared_phm_rule:
      shared.update(rules(()))
    if self.shared_W_phm:
      shared.update({projection: weights((), projection) for projection in PROJECTIONS})
    for site in self.sites:
      for projection, (_, o) in self.widths(config).items():
        leaves = {} if self.shared_W_phm else weights(layers, projection)
        if self.phm_bias:
          leaves['bias'] = jnp.zeros(layers + (o,), jnp.float32)
        if not self.shared_phm_rule:
          leaves.update(rules(layers))
        if leaves:  # an empty subtree would not survive a file's flat names
          tree.setdefault(site, {})[projection] = leaves
    if shared:
      tree['shared'] = shared
    return tree

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'compacter', 'bottleneck_dim': self.bottleneck_dim(config),
            'non_linearity': self.activation, 'adapter_placement': FILE_PLACEMENTS[self.placement],
            'scaling': self.scale, 'num_layers': config.num_layers, 'phm_dim': self.phm_dim,
            'phm_rank': self.phm_rank, 'shared_phm_rule': self.shared_phm_rule,
            'factorized_phm_rule': self.factorized_phm_rule,
            'factorized_phm_W': self.factorized_phm_W, 'shared_W_phm': self.shared_W_phm,
            'phm_bias': self.phm_bias}

  def projection_leaves(self, tree, site: str, projection: str, layers: int) -> dict:
    """One projection's leaves, each with the layers axis (shared ones broadcast)."""
    shared = tree.get('shared', {})
    common = {name: value for name, value in shared.items() if name.startswith('rule')}
    common.update(shared.get(projection, {}))
    leaves = {name: jnp.broadcast_to(value, (layers, *value.shape))
              for name, value in common.items()}
    leaves.update(tree.get(site, {}).get(projection, {}))
    return leaves

  def kronecker_sum(self, leaves, i: int, o: int):
    """H [L, I, O] = Σ_c A_c ⊗ W_c of every layer, in fp32."""
    f32 = lambda name: jnp.asarray(leaves[name], jnp.float32)
    if self.factorized_phm_W:
      w_LCUY = jnp.einsum('lcuq,lcqy->lcuy', f32('w_left'), f32('w_right'), precision=HIGHEST)
    else:
      w_LCUY = f32('w')
    if self.factorized_phm_rule:
      rule_LCCC = f32('rule_left') * f32('rule_right')  # [L,C,C,1]·[L,C,1,C]: outer products
    else:
      rule_LCCC = f32('rule')
    h = jnp.einsum('lcab,lcuy->lauby', rule_LCCC, w_LCUY, precision=HIGHEST)
    return h.reshape(h.shape[0], i, o)

  def layer_inputs(self, tree, config):
    """Per site, bottleneck.py's leaves: down [L,D,R], up [L,R,D] and the biases."""
    layers, out = config.num_layers, {}
    for site in self.sites:
      p = {}
      for projection, (i, o) in self.widths(config).items():
        leaves = self.projection_leaves(tree, site, projection, layers)
        p[projection] = self.kronecker_sum(leaves, i, o)
        if self.phm_bias:
          p[f'{projection}_bias'] = leaves['bias']
      out[site] = p
    return out

  def attn_delta(self, p, r, f):
    if self.placement == 'houlsby':
      return adapter_output(p['attn'], f, self.activation, self.scale)
    return None

  def mlp_delta(self, p, r, f):
    return adapter_output(p['mlp'], mlp_adapter_input(self.placement, r, f), self.activation,
                          self.scale)

  def stack_with(self, others, config) -> Compacter:
    """The same structure at the widest bottleneck and the largest phm_rank."""
    for other in others:
      differ = [f for f in STACK_FIELDS if getattr(other, f) != getattr(self, f)]
      if differ:
        raise ValueError(f'{self.call_string()} and {other.call_string()} cannot share a stack: '
                         f'their {", ".join(differ)} differ, so their leaves have no common form')
    widest = max((self, *others), key=lambda m: m.bottleneck_dim(config))
    return dataclasses.replace(self, reduction_factor=widest.reduction_factor,
                               phm_rank=max(m.phm_rank for m in (self, *others)))

  def widen(self, tree, wide: Compacter, config):
    """Zeros appended to each W_c's R/n axis and rank axis, and to b_down per rule block: H_down
    gains zero columns and H_up zero rows, at positions b·R'/n + y with y ≥ R/n, so the extra
    units read zero, give act(0) = 0 and write nothing, exactly."""
    n = self.phm_dim
    dy = (wide.bottleneck_dim(config) - self.bottleneck_dim(config)) // n
    dq = wide.phm_rank - self.phm_rank
    pads = {('down', 'w_left'): (0, 0, dq), ('down', 'w_right'): (0, dq, dy),
            ('down', 'w'): (0, 0, dy), ('up', 'w_left'): (0, dy, dq),
            ('up', 'w_right'): (0, dq, 0), ('up', 'w'): (0, dy, 0)}

    def pad(projection, name, x):
      if projection == 'down' and name == 'bias':  # [L, n·R/n]: the R/n axis of each block
        x_LCY = jnp.reshape(x, (x.shape[0], n, -1))
        return jnp.pad(x_LCY, ((0, 0), (0, 0), (0, dy))).reshape(x.shape[0], -1)
      if (projection, name) not in pads:  # rules, b_up: unchanged
        return x
      return jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, w) for w in pads[projection, name]])

    return {part: {key: ({name: pad(key, name, x) for name, x in value.items()}
                         if isinstance(value, dict) else value)
                   for key, value in subtree.items()}
            for part, subtree in tree.items()}
