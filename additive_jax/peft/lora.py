"""LoRA: a trainable low-rank update beside each targeted projection (the baseline).

Each targeted projection y = W x gains a rank-r path scaled by α/r:

    y = W x + (α/r) · B (A x)        A: [I, r], B: [r, O]

where I and O are the projection's flattened input and output widths (q: I = D,
O = N·H; k, v: D → K·H; o: N·H → D; gate, up: D → F; down: F → D). Targets are
any of q, k, v, o, gate, up, down (HF PEFT's q_proj … down_proj).

Initialization as HF PEFT's default (`init_lora_weights=True`): A is
kaiming-uniform with a = √5, i.e. U(±1/√I) (`nn.init.kaiming_uniform_` on the
[r, I] `lora_A.weight`); B = 0, so LoRA is the identity at init.

Parameters: L · r · Σ_targets (I + O) (Llama-3.2-1B, r = 16, all seven targets:
16 · 16 · (2·(2048 + 2048) + 2·(2048 + 512) + 3·(2048 + 8192)) = 11,272,192).

Merging adds (α/r)·A·B, reshaped to the kernel's head layout, to the kernel;
unmerging subtracts the same product (computed identically), which restores the
weights up to two fp32 roundings: |ΔW| ≤ u·(|W_merged| + |W_restored|), u = 2⁻²⁴.

With `gate` (UniPELT, peft/gate.py) each target's path is scaled by a learned
gate on its input instead of α/r, as AdapterHub's gated LoRA does
(methods/lora.py:163-171): y = W x + g(x) · B (A x), L · (I + 1) more
parameters a target; a gated LoRA does not merge (the gate depends on the input).

Leaves (fp32, leading layers axis), per target: {'q': {'a': [L, I, r], 'b': [L, r, O]}}
(and 'gate' [L, I], 'gate_bias' [L] with a gate).
HF PEFT keeps the transposes: `...q_proj.lora_A.weight` [r, I] = aᵀ and
`...q_proj.lora_B.weight` [O, r] = bᵀ.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
HF PEFT: `LoraConfig(r=rank, lora_alpha=alpha, target_modules=[...])`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from additive_jax.peft.base import Method, require_number, require_positive_int
from additive_jax.peft.gate import gate_leaves, gate_values, require_gate
from additive_jax.peft.merge import stages

# target -> the params path of its projection
TARGETS = {'q': ('layers', 'self_attn', 'q_proj'), 'k': ('layers', 'self_attn', 'k_proj'),
           'v': ('layers', 'self_attn', 'v_proj'), 'o': ('layers', 'self_attn', 'o_proj'),
           'gate': ('layers', 'mlp', 'gate_proj'), 'up': ('layers', 'mlp', 'up_proj'),
           'down': ('layers', 'mlp', 'down_proj')}


@jax.custom_vjp
def _low_rank(x_MI, a_IR, b_RO):
  """(x A) B over M = B·T positions, with its backward written out: the gradient autodiff
  derives is the same, but XLA:CPU lays its weight gradients out badly (it transposes the
  [M, O] cotangent in memory for every target of every layer, and runs the product outside
  its fast matmul path): LoRA on all seven projections took 1.8× the step of q and v alone.
  Here each weight gradient contracts the positions with both operands in their own layout
  and only the rank-R factors are transposed (`benchmarks/train_throughput.py`)."""
  return (x_MI @ a_IR) @ b_RO


def _low_rank_forward(x_MI, a_IR, b_RO):
  z_MR = x_MI @ a_IR
  return z_MR @ b_RO, (x_MI, a_IR, b_RO, z_MR)


def _low_rank_backward(residuals, g_MO):
  x_MI, a_IR, b_RO, z_MR = residuals
  g_MR = g_MO @ b_RO.T
  d_b_RO = jax.lax.dot(z_MR.T, g_MO)
  d_a_IR = jax.lax.dot(g_MR.T, x_MI).T
  return g_MR @ a_IR.T, d_a_IR, d_b_RO


_low_rank.defvjp(_low_rank_forward, _low_rank_backward)


def widths(config, target: str) -> tuple[int, int]:
  """(I, O): the flattened input and output widths of a target projection."""
  d, f = config.hidden_size, config.intermediate_size
  nh, kh = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {'q': (d, nh), 'k': (d, kh), 'v': (d, kh), 'o': (nh, d),
          'gate': (d, f), 'up': (d, f), 'down': (f, d)}[target]


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  rank: int = 8
  alpha: float = 16
  targets: tuple[str, ...] = ('q', 'v')
  gate: str = ''

  key: ClassVar[str] = 'lora'
  presets: ClassVar[dict] = {'lora': {'rank': 8, 'alpha': 16, 'targets': tuple(TARGETS)}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 5e-4}

  def __post_init__(self):
    require_positive_int('LoRA', 'rank', self.rank)
    require_number('LoRA', 'alpha', self.alpha)
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      problem = f'unknown {unknown}' if unknown else 'empty or repeated'
      raise ValueError(f'LoRA targets {problem} in {self.targets!r}; valid targets: '
                       f'{", ".join(TARGETS)}')
    object.__setattr__(self, 'targets', targets)  # a list becomes a hashable tuple
    require_gate('LoRA', self.gate)

  @property
  def causal(self) -> bool:
    return self.gate != 'sequence'

  @property
  def mergeable(self) -> bool:  # a gate depends on the input: no fixed weight to fold
    return not self.gate

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def num_params(self, config) -> int:
    per_layer = sum(self.rank * (i + o) + (i + 1 if self.gate else 0)
                    for i, o in (widths(config, t) for t in self.targets))
    return config.num_layers * per_layer

  def init_leaves(self, rng, config, params, tokenizer=None):
    tree = {}
    for target, key in zip(self.targets, jax.random.split(rng, len(self.targets))):
      i, o = widths(config, target)
      if self.gate:  # only then: an ungated LoRA draws exactly what it drew before gates
        key, gate_key = jax.random.split(key)
      bound = 1.0 / math.sqrt(i)  # kaiming_uniform_(a=√5) on [r, I]: gain √(1/3) · √(3/I)
      tree[target] = {
          'a': jax.random.uniform(key, (config.num_layers, i, self.rank), jnp.float32, -bound, bound),
          'b': jnp.zeros((config.num_layers, self.rank, o), jnp.float32)}
      if self.gate:
        tree[target].update(gate_leaves(gate_key, config.num_layers, i, 'linear'))
    return tree

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'lora', 'r': self.rank, 'lora_alpha': self.alpha,
            'target_modules': [f'{t}_proj' for t in self.targets], 'num_layers': config.num_layers,
            **({'gate': self.gate} if self.gate else {})}

  def project(self, p, name, x, y):
    if name not in self.targets:
      return y
    dtype = y.dtype  # the compute dtype; the leaves stay fp32 in storage
    batch = x.shape[:2]
    x_BTI = x.reshape(batch + (-1,))  # o_proj reads the heads [B,T,N,H] as N·H features
    delta_MO = _low_rank(x_BTI.reshape(-1, x_BTI.shape[-1]).astype(dtype),
                         p[name]['a'].astype(dtype), p[name]['b'].astype(dtype))
    delta_BTO = delta_MO.reshape(batch + (-1,))
    if self.gate:
      delta_BTO = delta_BTO * gate_values(p[name], x_BTI.astype(dtype), self.gate)
    else:
      delta_BTO = delta_BTO * jnp.asarray(self.scaling, dtype)
    return y + delta_BTO.reshape(y.shape)

  def stack_with(self, others, config) -> LoRA:
    """LoRA(rank=R, alpha=R, same targets), R the largest rank: each adapter's α/r goes into
    its B when widened, so the stack's scaling is 1."""
    other = next((m for m in others if m.targets != self.targets), None)
    if other is not None:
      raise ValueError(f'LoRA adapters on {self.targets} and {other.targets} cannot share a '
                       'stack: their targets differ')
    other = next((m for m in others if m.gate != self.gate), None)
    if other is not None:
      raise ValueError(f'LoRA adapters with gate={self.gate!r} and {other.gate!r} cannot share a '
                       'stack: a gate replaces α/r')
    rank = max(m.rank for m in (self, *others))
    return LoRA(rank=rank, alpha=rank, targets=self.targets, gate=self.gate)

  def widen(self, tree, wide: LoRA, config):
    """A zero-padded to [L, I, R] and (α/r)·B to [L, R, O]: the same B·A, exactly."""
    pad = wide.rank - self.rank
    scaling = jnp.float32(1.0 if self.gate else self.scaling)  # a gate scales by itself
    return {t: {**tree[t], 'a': jnp.pad(tree[t]['a'], ((0, 0), (0, 0), (0, pad))),
                'b': jnp.pad(tree[t]['b'] * scaling, ((0, 0), (0, pad), (0, 0)))}
            for t in self.targets}

  def delta(self, tree, target: str, kernel_shape) -> jax.Array:
    """(α/r)·A·B for every layer, fp32, in the kernel's layout ([L, D, N, H] for q, ...).

    HIGHEST precision so that accelerators do not round the product through bf16
    passes; the same function serves merge and unmerge, so both add the same numbers.
    """
    ab_LIO = jnp.einsum('lir,lro->lio', jnp.asarray(tree[target]['a'], jnp.float32),
                        jnp.asarray(tree[target]['b'], jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return (ab_LIO * jnp.float32(self.scaling)).reshape(kernel_shape)

  def merge(self, tree, params, config, stage=None):
    """Params with W + (α/r)·A·B. LoRA acts only at the projection sites, so it has
    nothing to fold at `stage='mlp_hidden'` (see merge.py for the stages)."""
    if self.gate:
      raise ValueError(f'{self.call_string()} cannot be merged into the base weights: its gate '
                       'depends on the input')
    return self._fold(tree, params, stage, jnp.add)

  def unmerge(self, tree, params, config, stage=None):
    return self._fold(tree, params, stage, jnp.subtract)

  def _fold(self, tree, params, stage, op):
    if 'project' not in stages(stage):
      return params
    flat = traverse_util.flatten_dict(params)
    for target in self.targets:
      path = TARGETS[target] + ('kernel',)
      kernel = flat[path]
      merged = op(kernel.astype(jnp.float32), self.delta(tree, target, kernel.shape))
      flat[path] = merged.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)
