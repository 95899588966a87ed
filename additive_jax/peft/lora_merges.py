"""LoRA adapters merged into one LoRA, as HF PEFT's `add_weighted_adapter` does (peft 0.21).

    methods, peft = aj.peft.merge_lora([(methods_a, peft_a), (methods_b, peft_b)], [0.7, 0.3],
                                       how='ties', density=0.5)

Each adapter is one ungated LoRA (rank r_i, α_i, scaling s_i = α_i/r_i, its targets);
w_i its weight (any sign; not normalized). The merged LoRA targets the union of the
targets; at each target only the adapters that have it take part. Its α is its rank
(scaling 1: the weights and s_i are folded into the leaves, as PEFT does). With PEFT's
names (A = aᵀ [r, I], B = bᵀ [O, r]) and ΔW_i = s_i · B_i A_i:

  linear, ties, dare_linear, dare_ties, magnitude_prune  (all ranks equal; rank r)
      A = rule({A_i}, {sign(w_i s_i)·√|w_i s_i|}),  B = rule({B_i}, {√|w_i s_i|})
      A and B are combined apart (task_arithmetic.py's rules), so linear's B·A is
      Σ_ij √(w_i s_i)√(w_j s_j) B_j A_i, cross terms included: PEFT's "rough approximation"
  cat  (rank Σ r_i)
      A = [w_1 s_1 A_1; w_2 s_2 A_2; …] stacked on the rank axis, B = [B_1, B_2, …]:
      B·A = Σ w_i ΔW_i exactly; an adapter without the target leaves its rows zero, after
      the ones that have it (PEFT packs them first)
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd  (rank `rank`, default max r_i)
      ΔW = rule({ΔW_i}, {w_i}), then B = U[:, :r]·S[:r], A = Vh[:r] (`svd_clamp`:
      both clamped to ±their `svd_clamp` quantile; `svd_full_matrices` as torch's)

`density` (0 < density ≤ 1) is the fraction TIES, DARE and magnitude pruning keep;
`majority_sign_method` ('total' or 'frequency') TIES' sign election. DARE keeps each
entry with probability `density`: pass `masks` (per adapter, {target: {'a': keep, 'b':
keep}} of the leaves' shapes, or {target: {'delta': keep [L, I, O]}} for the _svd rules;
1 = kept) or `rng` (a jax key) to draw them. One adapter is merged linearly, whatever
`how` says, as PEFT does. PEFT's `svd_driver` picks a cuSOLVER routine; JAX offers no
such choice, so it is not an argument here.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from additive_jax.peft.base import Method
from additive_jax.peft.lora import TARGETS, LoRA
from additive_jax.peft.task_arithmetic import SIGN_METHODS, combine, lora_delta, truncated_svd

HOWS = ('svd', 'linear', 'cat', 'ties', 'ties_svd', 'dare_ties', 'dare_linear', 'dare_ties_svd',
        'dare_linear_svd', 'magnitude_prune', 'magnitude_prune_svd')
PRUNING = tuple(h for h in HOWS if h.startswith(('ties', 'dare', 'magnitude')))
DARE = tuple(h for h in HOWS if h.startswith('dare'))


def rule_of(how: str) -> str:
  """The task-arithmetic rule of a merge type: 'svd' and 'cat' sum linearly."""
  rule = how.removesuffix('_svd')
  return 'linear' if rule in ('svd', 'cat') else rule


def check_weights(weights, count: int, what: str) -> list[float]:
  """The weights as floats: one finite number per adapter."""
  weights = list(weights)
  if len(weights) != count:
    raise ValueError(f'{what}: {len(weights)} weights for {count} adapters')
  bad = [w for w in weights if not isinstance(w, numbers.Real) or isinstance(w, bool)
         or not math.isfinite(w)]
  if bad:
    raise ValueError(f'{what}: weights must be finite numbers, got {bad[0]!r}')
  return [float(w) for w in weights]


def _loras(adapters, what: str) -> list[tuple[LoRA, dict]]:
  """(LoRA, its leaves) of each adapter: one ungated LoRA each."""
  loras = []
  for index, (methods, peft) in enumerate(adapters):
    methods = tuple(methods)
    if len(methods) != 1 or not isinstance(methods[0], LoRA):
      calls = ', '.join(m.call_string() for m in methods) or 'no method'
      raise ValueError(f'{what}: adapter {index} holds {calls}; it merges adapters of one LoRA each')
    if methods[0].gate:
      raise ValueError(f'{what}: adapter {index} is {methods[0].call_string()}, a gated LoRA: its '
                       'gate replaces α/r and cannot be merged')
    loras.append((methods[0], peft[methods[0].key]))
  return loras


def _check_options(how, density, majority_sign_method, rank, svd_clamp):
  if how not in HOWS:
    raise ValueError(f'merge_lora how must be one of {", ".join(HOWS)}, got {how!r}')
  if how in PRUNING:
    if not isinstance(density, numbers.Real) or not 0 < density <= 1:
      raise ValueError(f'merge_lora how={how!r} needs a density in (0, 1], got {density!r}')
  elif density is not None:
    raise ValueError(f'merge_lora how={how!r} prunes nothing: density is for '
                     f'{", ".join(PRUNING)}')
  if majority_sign_method not in SIGN_METHODS:
    raise ValueError(f'merge_lora majority_sign_method must be one of {SIGN_METHODS}, got '
                     f'{majority_sign_method!r}')
  if not how.endswith('svd') and (rank is not None or svd_clamp is not None):
    raise ValueError(f'merge_lora how={how!r} keeps the adapters\' rank: rank and svd_clamp are '
                     'for the _svd merges')
  if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
    raise ValueError(f'merge_lora rank must be a positive integer, got {rank!r}')
  if svd_clamp is not None and not (isinstance(svd_clamp, numbers.Real) and 0 <= svd_clamp <= 1):
    raise ValueError(f'merge_lora svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}')


def _masks(masks, rng, loras, how, density, delta_shapes):
  """Per adapter {target: {leaf: keep mask}}: `masks` checked, or drawn from `rng`."""
  leaves = ('delta',) if how.endswith('svd') else ('a', 'b')
  shapes = [{t: {leaf: (delta_shapes[t] if leaf == 'delta' else tree[t][leaf].shape)
                 for leaf in leaves} for t in method.targets} for method, tree in loras]
  if masks is None:
    if rng is None:
      raise ValueError(f'merge_lora how={how!r} drops entries at random: pass rng= (a jax '
                       'random key) or masks=')
    keys = iter(jax.random.split(rng, sum(len(s) * len(leaves) for s in shapes)))
    return [{t: {leaf: jax.random.bernoulli(next(keys), density, shape).astype(jnp.float32)
                 for leaf, shape in by_leaf.items()} for t, by_leaf in adapter.items()}
            for adapter in shapes]
  if len(masks) != len(loras):
    raise ValueError(f'merge_lora: {len(masks)} masks for {len(loras)} adapters')
  for index, (given, wanted) in enumerate(zip(masks, shapes)):
    for target, by_leaf in wanted.items():
      for leaf, shape in by_leaf.items():
        got = getattr(given.get(target, {}).get(leaf), 'shape', None)
        if tuple(got or ()) != tuple(shape):
          raise ValueError(f'merge_lora: masks[{index}][{target!r}][{leaf!r}] has shape {got}, '
                           f'adapter {index} needs {tuple(shape)}')
  return masks


def merge_lora(adapters: Sequence[tuple[Sequence[Method], dict]], weights: Sequence[float],
               how: str = 'svd', *, density: float | None = None, rank: int | None = None,
               majority_sign_method: str = 'total', svd_clamp: float | None = None,
               svd_full_matrices: bool = True, masks=None, rng=None) -> tuple[tuple, dict]:
  """((LoRA(rank=R, alpha=R, targets=union),), {'lora': leaves}) of `adapters`, each
  (methods, peft) of one LoRA, merged by `how` with `weights` (see the module's docstring)."""
  if not adapters:
    raise ValueError('merge_lora needs at least one adapter')
  _check_options(how, density, majority_sign_method, rank, svd_clamp)
  loras = _loras(adapters, 'merge_lora')
  weights = check_weights(weights, len(loras), 'merge_lora')
  if len(loras) == 1:
    how, density, rank, svd_clamp, masks = 'linear', None, None, None, None
  ranks = [method.rank for method, _ in loras]
  targets = tuple(t for t in TARGETS if any(t in method.targets for method, _ in loras))
  widths = {t: next(tree[t]['a'].shape[1:2] + tree[t]['b'].shape[2:]
                    for method, tree in loras if t in method.targets) for t in targets}
  if how == 'cat':
    new_rank = sum(ranks)
  elif how.endswith('svd'):
    new_rank = rank or max(ranks)
    narrow = [t for t in targets if new_rank > min(widths[t])]
    if narrow:
      raise ValueError(f'merge_lora rank={new_rank} exceeds min(I, O)={min(widths[narrow[0]])} '
                       f'of target {narrow[0]!r}: a truncated SVD has no more singular values')
  else:
    if len(set(ranks)) > 1:
      raise ValueError(f'merge_lora how={how!r} needs adapters of one rank, got ranks {ranks}; '
                       "use how='cat' or an _svd merge")
    new_rank = ranks[0]
  if how in DARE:
    num_layers = loras[0][1][loras[0][0].targets[0]]['a'].shape[0]
    masks = _masks(masks, rng, loras, how, density,
                   {t: (num_layers,) + widths[t] for t in targets})
  elif masks is not None:
    raise ValueError(f'merge_lora how={how!r} draws nothing: masks are for {", ".join(DARE)}')
  rule = rule_of(how)
  tree = {}
  for target in targets:
    present = [i for i, (method, _) in enumerate(loras) if target in method.targets]
    leaves = [loras[i][1][target] for i in present]
    scalings = [loras[i][0].scaling for i in present]
    keep = [masks[i][target] for i in present] if how in DARE else None
    if how == 'cat':
      tree[target] = _cat(leaves, [weights[i] for i in present], scalings, new_rank)
    elif how.endswith('svd'):
      deltas_LOI = [lora_delta(leaf['a'], leaf['b'], s) for leaf, s in zip(leaves, scalings)]
      delta_LOI = combine(deltas_LOI, [weights[i] for i in present], rule, density,
                          majority_sign_method,
                          keep and [jnp.swapaxes(jnp.asarray(k['delta']), 1, 2) for k in keep])
      a, b = truncated_svd(delta_LOI, new_rank, svd_clamp, svd_full_matrices)
      tree[target] = {'a': a, 'b': b}
    else:
      scaled = [weights[i] * s for i, s in zip(present, scalings)]
      root = [math.sqrt(abs(x)) for x in scaled]
      weights_a = [r if x >= 0 else -r for r, x in zip(root, scaled)]  # the sign on A alone
      tree[target] = {
          leaf: combine([x[leaf] for x in leaves], w, rule, density, majority_sign_method,
                        keep and [k[leaf] for k in keep])
          for leaf, w in (('a', weights_a), ('b', root))}
  return (LoRA(rank=new_rank, alpha=new_rank, targets=targets),), {'lora': tree}


def _cat(leaves, weights, scalings, new_rank):
  """A·w·s of each adapter and its B side by side on the rank axis, zero-padded to new_rank."""
  a = jnp.concatenate([jnp.asarray(x['a'], jnp.float32) * jnp.float32(w) * jnp.float32(s)
                       for x, w, s in zip(leaves, weights, scalings)], axis=2)
  b = jnp.concatenate([jnp.asarray(x['b'], jnp.float32) for x in leaves], axis=1)
  pad = new_rank - a.shape[2]
  return {'a': jnp.pad(a, ((0, 0), (0, 0), (0, pad))), 'b': jnp.pad(b, ((0, 0), (0, pad), (0, 0)))}
