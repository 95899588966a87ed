"""Our side of the AdapterHub cross-check (see run.sh); runs in the main venv.

    jax_side.py export WORK [smollm2]
                               a tiny random Llama (WORK/base), our adapters with random weights
                               as AdapterHub files (WORK/ours/<config>), our logits; with
                               `smollm2`, the embedded SmolLM2-135M and one adapter per method
                               family (SMOLLM2), and none of AdapterHub's own
    jax_side.py compare WORK   AdapterHub's logits for them, and AdapterHub's own adapters
                               (WORK/theirs/<config>) read here: max relative errors, exit 1 above 1e-5
"""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import additive_jax as aj

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from adapter_files_helpers import random_peft  # noqa: E402
from conftest import TINY as CONFIG, relative_error  # noqa: E402

OURS = {'seq_bn': aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),
        'double_seq_bn': aj.peft.Bottleneck(5, 'houlsby', 'silu'),
        'par_bn': aj.peft.Bottleneck(12, 'parallel', 'relu', scale=4.0),
        'loreft': aj.peft.ReFT(2, layers=(1,), prefix_positions=3, suffix_positions=2),
        'noreft': aj.peft.ReFT(2, prefix_positions=2, kind='noreft', activation='gelu'),
        # written in NoReFT's layout, read there into a DiReftConfig adapter (adapterhub_reft.py)
        'direft': aj.peft.ReFT(3, layers=(0, 2), prefix_positions=2, suffix_positions=1,
                               kind='direft')}
# what AdapterHub's adapters in adapterhub_side.py are here
THEIRS = {'seq_bn': aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),
          'double_seq_bn': aj.peft.Bottleneck(4, 'houlsby', 'silu'),
          'par_bn': aj.peft.Bottleneck(3, 'parallel', 'relu', scale=4.0),
          'loreft': aj.peft.ReFT(2, layers=(0, 2), prefix_positions=2, suffix_positions=1),
          'noreft': aj.peft.ReFT(3, prefix_positions=1, suffix_positions=2, kind='noreft',
                                 tied=True, activation='relu')}
# on SmolLM2, once per method family (the base is a 540 MB checkpoint for AdapterHub to read)
SMOLLM2 = {'loreft': aj.peft.ReFT(4, layers=(3, 17, 29), prefix_positions=3, suffix_positions=2)}
# a left-padded row and a right-padded one: ReFT's positions count the real tokens
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
TOLERANCE = 1e-5  # fp32 on both sides, the same weights: rounding differences only


def logits(params, methods, peft, tokens, config=CONFIG):
  """Logits at the real tokens (zero at padding, which no two implementations agree on)."""
  model = aj.Llama(config, peft=methods)
  out = model.apply({'params': params, 'peft': peft}, jnp.asarray(tokens),
                    attention_mask=jnp.asarray(MASK))
  return np.asarray(out) * MASK[..., None]


def export(work, base='tiny'):
  if base == 'smollm2':
    config, params = aj.load_model('smollm2-135m-instruct')
    ours, theirs = SMOLLM2, []
  else:
    config, ours, theirs = CONFIG, OURS, list(THEIRS)
    variables = aj.Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    params = nn.unbox(variables)['params']
  aj.peft.save_merged(os.path.join(work, 'base'), aj.Llama(config), {'params': params})
  with open(os.path.join(work, 'which.json'), 'w', encoding='utf-8') as f:
    json.dump({'ours': list(ours), 'theirs': theirs}, f)
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
  with open(os.path.join(work, 'tokens.json'), 'w', encoding='utf-8') as f:
    json.dump(tokens.tolist(), f)
  with open(os.path.join(work, 'mask.json'), 'w', encoding='utf-8') as f:
    json.dump(MASK.tolist(), f)
  for seed, (name, method) in enumerate(ours.items()):
    peft = random_peft((method,), config, seed)
    saved = dataclasses.replace(method, kind='noreft') if name == 'direft' else method
    aj.peft.save_adapter(os.path.join(work, 'ours', name), (saved,), peft, config,
                         format='adapterhub')
    safetensors.numpy.save_file({'logits': logits(params, (method,), peft, tokens, config)},
                                os.path.join(work, 'ours', f'{name}.logits.safetensors'))


def compare(work):
  config, params = aj.load_model(os.path.join(work, 'base'))
  with open(os.path.join(work, 'which.json'), encoding='utf-8') as f:
    which = json.load(f)
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    tokens = np.asarray(json.load(f))
  theirs = {name: value * MASK[..., None] for name, value in safetensors.numpy.load_file(
      os.path.join(work, 'adapterhub_logits.safetensors')).items()}
  base = logits(params, (), {}, tokens, config)
  rows = [('base model', relative_error(base, theirs['base']), None)]
  for name in which['ours']:
    ours = safetensors.numpy.load_file(os.path.join(work, 'ours', f'{name}.logits.safetensors'))
    rows.append((f'ours -> AdapterHub {name}', relative_error(ours['logits'], theirs[f'ours/{name}']),
                 relative_error(theirs[f'ours/{name}'], theirs['base'])))
  for name in which['theirs']:
    expected = THEIRS[name]
    methods, peft = aj.peft.load_adapter(os.path.join(work, 'theirs', name), config)
    if methods != (expected,):
      sys.exit(f'AdapterHub {name} read as {methods[0].call_string()}, expected '
               f'{expected.call_string()}')
    ours = logits(params, methods, peft, tokens, config)
    rows.append((f'AdapterHub {name} -> ours', relative_error(ours, theirs[f'theirs/{name}']),
                 relative_error(theirs[f'theirs/{name}'], theirs['base'])))
  for label, error, effect in rows:
    effect_text = '' if effect is None else f'   (adapter changes the logits by {effect:.2f})'
    print(f'{label:<34} max relative error {error:.1e}{effect_text}')
  failed = [label for label, error, effect in rows
            if error > TOLERANCE or (effect is not None and effect < 1e-2)]
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
  {'export': export, 'compare': compare}[sys.argv[1]](*sys.argv[2:])
