"""Trainable parameters of a set of methods on a model config, without loading weights.

    python -m additive_jax.count --config=path/to/config.json \
        --peft="Bottleneck(dim=64, placement='houlsby')" --peft="IA3()"

`--config` is a `config.json`, an HF checkpoint directory, a `.gguf` file or
"smollm2-135m-instruct". Prints method, trainable parameters (formula = leaves,
checked), % of the base, and the adapter's tensor bytes in fp32 and bf16.
"""

import json
import os
import sys

from absl import app, flags

from additive_jax.model.config import LlamaConfig
from additive_jax.model.load import resolve
from additive_jax.peft.count import count_methods
from additive_jax.peft.registry import check_methods, parse_method

_CONFIG = flags.DEFINE_string('config', None, 'config.json, HF directory, .gguf or embedded name',
                              required=True)
_PEFT = flags.DEFINE_multi_string('peft', [], 'a method as its constructor call, e.g. "IA3()"')


def read_config(path: str) -> LlamaConfig:
  if path.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      return LlamaConfig.from_hf(json.load(f))
  path = resolve(path)
  if os.path.isdir(path):
    from additive_jax.model.hf_checkpoint import read_hf_config
    return read_hf_config(path)
  from additive_jax.model.gguf_checkpoint import config_from_gguf, open_gguf
  return config_from_gguf(open_gguf(path), path)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    config = read_config(_CONFIG.value)
    methods = tuple(parse_method(text) for text in _PEFT.value)
    check_methods(methods, config)
  except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
    sys.exit(f'error: {err}')
  counts = count_methods(methods, config)
  for c in counts:
    if c.formula != c.leaves:  # a formula that disagrees with the tree is a bug, not a rounding
      raise AssertionError(f'{c.method}: formula gives {c.formula:,}, leaves {c.leaves:,}')
  print(format_table(counts, config.num_base_params))


if __name__ == '__main__':
  app.run(main)
