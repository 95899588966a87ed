"""A weighted average of trained adapters, as AdapterHub's `average_adapter` (adapters 1.3.0).

    methods, peft = aj.peft.average([(methods_a, peft_a), (methods_b, peft_b)], [0.7, 0.3])

Adapters of one method set (the same settings, an init aside, as AdapterHub compares
configs without `init_weights`) and one shape; every leaf of the result is

    θ = Σ_i w_i θ_i          w_i = 1/n by default; given weights are divided by their sum
                             (`normalize_weights=True`, AdapterHub's default) or taken as they are

for every method, AdapterHub's "linear" combine strategy (model_mixin.py average_adapter,
methods/adapter_layer_base.py). The leaves are averaged as stored, the training form: a
prefix trained through its MLP averages the MLP's weights, not the prefixes it computes
(`Method.fold`), as AdapterHub averages its prefix's `control_trans`; a method whose leaves
are not a linear function of what it computes (a prefix's MLP, LoReFT's orthogonal R) gets
the average of the parameters, which is what AdapterHub gives too.

For adapters that are all one LoRA (ungated), AdapterHub's other strategies
(methods/lora.py):
  lora_linear_only_negate_b   A = Σ |w_i| A_i, B = Σ w_i B_i (Zhang et al., 2023: a
                              negative weight negates B alone)
  lora_delta_w_svd            ΔW = Σ w_i B_i A_i (without α/r), truncated to `svd_rank`:
                              B = U[:, :k]·S[:k], A = Vh[:k]; the result is LoRA(rank=svd_rank,
                              alpha=α): AdapterHub keeps α, so its scaling is α/svd_rank and the
                              merged update is (r/svd_rank)·Σ w_i ΔW_i when svd_rank ≠ r
                              (aj.peft.merge_lora(..., how='svd') keeps Σ w_i ΔW_i at any rank)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from additive_jax.peft.base import Method
from additive_jax.peft.lora import LoRA
from additive_jax.peft.lora_merges import check_weights
from additive_jax.peft.task_arithmetic import lora_delta, truncated_svd

STRATEGIES = ('linear', 'lora_linear_only_negate_b', 'lora_delta_w_svd')
INIT_FIELDS = ('init', 'text')  # how a method starts, not what it computes once trained


def _settings(method: Method) -> tuple:
  return (type(method),) + tuple((f.name, getattr(method, f.name))
                                 for f in dataclasses.fields(method) if f.name not in INIT_FIELDS)


def _check_alike(adapters) -> None:
  """One method set, one set of settings, one leaf shape each; else the first difference."""
  first_methods, first_peft = adapters[0]
  first = {m.key: m for m in first_methods}
  first_shapes = {name: jnp.shape(leaf) for name, leaf in
                  traverse_util.flatten_dict({k: first_peft[k] for k in first}, sep='/').items()}
  for index, (methods, peft) in enumerate(adapters[1:], start=1):
    these = {m.key: m for m in methods}
    if sorted(these) != sorted(first):
      raise ValueError(f'average: adapter {index} has the methods {sorted(these)}, adapter 0 '
                       f'{sorted(first)}; average takes adapters of one method set')
    for key, method in these.items():
      if _settings(method) != _settings(first[key]):
        raise ValueError(f'average: adapter {index} has {method.call_string()}, adapter 0 '
                         f'{first[key].call_string()}; average takes adapters of one method set')
    missing = [key for key in these if key not in peft]
    if missing:
      raise ValueError(f'average: adapter {index} has no leaves for {missing}')
    shapes = {name: jnp.shape(leaf) for name, leaf in
              traverse_util.flatten_dict({k: peft[k] for k in these}, sep='/').items()}
    for name in sorted(set(shapes) | set(first_shapes)):
      if shapes.get(name) != first_shapes.get(name):
        raise ValueError(f"average: adapter {index}'s leaf {name} has shape {shapes.get(name)}, "
                         f"adapter 0's {first_shapes.get(name)}")


def _weights(weights, count: int, normalize: bool) -> list[float]:
  if weights is None:
    return [1.0 / count] * count  # AdapterHub: equal weights, whatever normalize_weights says
  weights = check_weights(weights, count, 'average')
  if not normalize:
    return weights
  total = sum(weights)
  if total == 0:
    raise ValueError(f'average: the weights {weights} sum to 0 and cannot be normalized; pass '
                     'normalize_weights=False to take them as they are')
  return [w / total for w in weights]


def _weighted_sum(leaves, weights):
  """w_0 θ_0 + w_1 θ_1 + … in fp32, in AdapterHub's order."""
  total = None
  for leaf, weight in zip(leaves, weights):
    term = jnp.asarray(leaf, jnp.float32) * jnp.float32(weight)
    total = term if total is None else total + term
  return total


def average(adapters: Sequence[tuple[Sequence[Method], dict]],
            weights: Sequence[float] | None = None, *, normalize_weights: bool = True,
            combine_strategy: str = 'linear',
            svd_rank: int | None = None) -> tuple[tuple[Method, ...], dict]:
  """(methods, peft) whose leaves are the weighted average of `adapters`' (see the module's
  docstring); numpy or jax leaves in, jnp fp32 leaves out."""
  adapters = [(tuple(methods), peft) for methods, peft in adapters]
  if not adapters:
    raise ValueError('average needs at least one adapter')
  if combine_strategy not in STRATEGIES:
    raise ValueError(f'average combine_strategy must be one of {", ".join(STRATEGIES)}, got '
                     f'{combine_strategy!r}')
  if (svd_rank is None) != (combine_strategy != 'lora_delta_w_svd'):
    raise ValueError("average: svd_rank is needed by combine_strategy='lora_delta_w_svd', and "
                     f'by no other (got svd_rank={svd_rank!r}, {combine_strategy!r})')
  _check_alike(adapters)
  weights = _weights(weights, len(adapters), normalize_weights)
  methods = adapters[0][0]
  if combine_strategy == 'linear':
    return methods, {m.key: jax.tree.map(lambda *leaves: _weighted_sum(leaves, weights),
                                         *[peft[m.key] for _, peft in adapters])
                     for m in methods}
  lora = methods[0]
  if len(methods) != 1 or not isinstance(lora, LoRA) or lora.gate:
    raise ValueError(f'average combine_strategy={combine_strategy!r} is for adapters of one '
                     f'ungated LoRA, not {", ".join(m.call_string() for m in methods)}')
  trees = [peft[lora.key] for _, peft in adapters]
  if combine_strategy == 'lora_linear_only_negate_b':
    return methods, {lora.key: {t: {
        'a': _weighted_sum([tree[t]['a'] for tree in trees], [abs(w) for w in weights]),
        'b': _weighted_sum([tree[t]['b'] for tree in trees], weights)} for t in lora.targets}}
  if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0:
    raise ValueError(f'average svd_rank must be a positive integer, got {svd_rank!r}')
  narrow = [t for t in lora.targets
            if svd_rank > min(trees[0][t]['a'].shape[1], trees[0][t]['b'].shape[2])]
  if narrow:
    raise ValueError(f'average svd_rank={svd_rank} exceeds min(I, O) of target {narrow[0]!r}: '
                     'a truncated SVD has no more singular values')
  tree = {}
  for target in lora.targets:
    deltas_LOI = [lora_delta(t[target]['a'], t[target]['b'], 1.0) for t in trees]
    a, b = truncated_svd(_weighted_sum(deltas_LOI, weights), svd_rank)
    tree[target] = {'a': a, 'b': b}
  return (LoRA(rank=svd_rank, alpha=lora.alpha, targets=lora.targets),), {lora.key: tree}
