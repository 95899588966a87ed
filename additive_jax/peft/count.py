"""Exact trainable-parameter counts, from each method's formula and from its leaves.

`count_leaves` builds the methods' trees with `jax.eval_shape` over abstract base
weights, so a count for an 8B config costs no memory and no weights are read.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class Count:
  method: str          # its constructor call
  formula: int
  leaves: int
  percent_of_base: float


def abstract_params(config: LlamaConfig):
  """Shapes and dtypes of the base params, without allocating them."""
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(shapes)['params']


def count_leaves(methods, config: LlamaConfig) -> dict[str, int]:
  params = abstract_params(config)
  trees = jax.eval_shape(lambda key, params: Llama(config, peft=methods).init_peft(key, params)['peft'],
                         jax.random.key(0), params)
  return {key: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
          for key, tree in trees.items()}


def count_methods(methods, config: LlamaConfig) -> list[Count]:
  leaves = count_leaves(methods, config)
  base = config.num_base_params
  return [Count(m.call_string(), m.num_params(config), leaves[m.key], 100 * leaves[m.key] / base)
          for m in methods]


def format_table(counts, base: int) -> str:
  width = max([len('base model')] + [len(c.method) for c in counts])
  header = f'{"method":<{width}} {"trainable":>14} {"% of base":>10} {"fp32":>10} {"bf16":>10}'
  lines = [header, '-' * len(header)]
  for c in counts:
    lines.append(f'{c.method:<{width}} {c.leaves:>14,} {c.percent_of_base:>9.4f}% '
                 f'{_megabytes(4 * c.leaves):>10} {_megabytes(2 * c.leaves):>10}')
  total = sum(c.leaves for c in counts)
  lines.append(f'{"total":<{width}} {total:>14,} {100 * total / base:>9.4f}% '
               f'{_megabytes(4 * total):>10} {_megabytes(2 * total):>10}')
  lines.append(f'{"base model":<{width}} {base:>14,}')
  return '\n'.join(lines)


def _megabytes(n: int) -> str:
  return f'{n / 2**20:.2f} MiB'
