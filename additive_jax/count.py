"""Trainable parameters of a set of methods on a model config, without loading weights.

    python -m additive_jax.count --config=path/to/config.json \
        --peft="Bottleneck(dim=64, placement='houlsby')" --peft="IA3()"

`--config` is a `config.json`, an HF checkpoint directory, a `.gguf` file or
"smollm2-135m-instruct". Prints method, trainable parameters (formula = leaves,
checked), % of the base, and the adapter's tensor bytes in fp32 and bf16; a method that
holds frozen leaves (AdapterFusion's fused adapters) has them counted in a `frozen` column,
never among the trainable ones.
"""

import sys

from absl import app, flags

from additive_jax import command
from additive_jax.model.load import load_config
from additive_jax.peft.param_count import count_methods, format_table
from additive_jax.model.hooks import check_methods
from additive_jax.peft.registry import parse_method

_CONFIG = flags.DEFINE_string('config', None, 'config.json, HF directory, .gguf or embedded name',
                              required=True)
_PEFT = flags.DEFINE_multi_string('peft', [], 'a method as its constructor call, e.g. "IA3()"')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    config = load_config(_CONFIG.value)
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
  command.run(main)
