"""Exact trainable-parameter counts, from each method's formula and from its leaves.

`leaf_shapes` builds the methods' trees with `jax.eval_shape` over abstract base
weights, so a count for an 8B config costs no memory and no weights are read.
A method's frozen leaves (`Method.frozen_keys`: adapters it loads and never trains) are
counted apart: "trainable" never includes them, and the table shows them in a column of
their own when a method has some.
"""

from __future__ import annotations

import dataclasses
import math

from flax import traverse_util
import jax

from additive_jax.model.config import LlamaConfig
from additive_jax.model.hooks import init_methods
from additive_jax.model.llama import abstract_params


@dataclasses.dataclass(frozen=True)
class Count:
  method: str          # its constructor call
  formula: int         # trainable, from the formula
  leaves: int          # trainable, from the leaves
  percent_of_base: float
  frozen_formula: int = 0   # the frozen leaves (never trained), from the formula
  frozen: int = 0           # ... and from the leaves


def leaf_shapes(methods, config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """'key/path/to/leaf' -> shape of every leaf the methods build on `config` (no weights read)."""
  shaped = [m.shape_alike() for m in methods]
  trees = jax.eval_shape(lambda key, params: init_methods(shaped, key, config, params),
                         jax.random.key(0), abstract_params(config))
  return {name: tuple(leaf.shape)
          for name, leaf in traverse_util.flatten_dict(trees, sep='/').items()}


def count_leaves(methods, config: LlamaConfig, frozen: bool = False) -> dict[str, int]:
  """Trainable parameters of each method (by key), from its leaves' shapes; `frozen=True`:
  its frozen leaves instead."""
  counts = {m.key: 0 for m in methods}
  frozen_keys = {m.key: getattr(m, 'frozen_keys', ()) for m in methods}
  for name, shape in leaf_shapes(methods, config).items():
    key, top = name.split('/')[:2]
    if (top in frozen_keys[key]) == frozen:
      counts[key] += math.prod(shape)
  return counts


def count_methods(methods, config: LlamaConfig) -> list[Count]:
  leaves, frozen = count_leaves(methods, config), count_leaves(methods, config, frozen=True)
  base = config.num_base_params
  return [Count(m.call_string(), m.num_params(config), leaves[m.key], 100 * leaves[m.key] / base,
                m.num_frozen_params(config), frozen[m.key])
          for m in methods]


def format_table(counts, base: int) -> str:
  """Trainable parameters, % of the base and their fp32 and bf16 bytes a method; a `frozen`
  column (leaves loaded, never trained) only when some method has frozen leaves."""
  width = max([len('base model')] + [len(c.method) for c in counts])
  frozen = any(c.frozen for c in counts)
  extra = lambda n: f' {n:>14,}' if frozen else ''
  header = (f'{"method":<{width}} {"trainable":>14} {"% of base":>10} {"fp32":>10} {"bf16":>10}'
            + (f' {"frozen":>14}' if frozen else ''))
  lines = [header, '-' * len(header)]
  for c in counts:
    lines.append(f'{c.method:<{width}} {c.leaves:>14,} {c.percent_of_base:>9.4f}% '
                 f'{_megabytes(4 * c.leaves):>10} {_megabytes(2 * c.leaves):>10}'
                 + extra(c.frozen))
  total = sum(c.leaves for c in counts)
  lines.append(f'{"total":<{width}} {total:>14,} {100 * total / base:>9.4f}% '
               f'{_megabytes(4 * total):>10} {_megabytes(2 * total):>10}'
               + extra(sum(c.frozen for c in counts)))
  lines.append(f'{"base model":<{width}} {base:>14,}')
  return '\n'.join(lines)


def _megabytes(n: int) -> str:
  return f'{n / 2**20:.2f} MiB'
