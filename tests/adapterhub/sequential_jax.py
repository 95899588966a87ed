"""Our side of the cross-check of aj.peft.Sequential against AdapterHub's `Stack`; main venv.

    sequential_jax.py export WORK    a tiny random Llama (WORK/base); per case of OURS, its
                                     frozen adapters as our adapter files (WORK/sources/<case>/<i>)
                                     with random weights, the Sequential reading them with a
                                     random trained adapter, written as AdapterHub files
                                     (WORK/ours/<case>/<i>), and our logits
    sequential_side.py WORK          (AdapterHub venv) their logits of each as a Stack; their own
                                     stacks of random adapters (WORK/theirs/<case>/<i>)
    sequential_jax.py compare WORK   max relative errors both ways, exit 1 above 1e-5; one
                                     weight perturbed must fail the check (the check can fail)

tests/test_peft_sequential.py runs the three steps.
"""

import json
import os
import sys

import jax
import numpy as np
import safetensors.numpy

import additive_jax as aj

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # tests/ and tests/adapterhub/
from adapter_files_helpers import random_peft  # noqa: E402
from conftest import TINY as CONFIG, relative_error  # noqa: E402
from jax_side import MASK, TOLERANCE, export_base, logits  # noqa: E402

B = aj.peft.Bottleneck
# case -> (the frozen adapters, the trained adapter's fields)
OURS = {'madx': ([B(24, 'pfeiffer', 'relu')], dict(dim=6, activation='gelu')),
        'mixed': ([B(5, 'houlsby', 'silu', scale=0.5), B(8, 'pfeiffer', 'relu')],
                  dict(dim=4, placement='houlsby', activation='gelu', scale=2.0)),
        'gated': ([B(6, 'pfeiffer', 'relu', gate='sequence')], dict(dim=3))}
# what AdapterHub's stacks in sequential_side.py are here: the frozen adapters, the trained one
THEIRS = {'madx': ([B(24, 'pfeiffer', 'relu')], B(3, 'pfeiffer', 'gelu')),
          'mixed': ([B(4, 'houlsby', 'silu'), B(6, 'pfeiffer', 'relu', scale=0.5)],
                    B(3, 'houlsby', 'relu', scale=2.0)),
          'gated': ([B(12, 'pfeiffer', 'relu', gate='sequence')], B(8, 'pfeiffer', 'gelu'))}
UNPADDED = 'gated'  # AdapterHub's gate averages over padding too (jax_side.UNPADDED)


def mask_for(case):
  return np.ones_like(MASK) if case == UNPADDED else MASK


def base_params(work):
  return aj.load_model(os.path.join(work, 'base'))[1]


def read_tokens(work):
  with open(os.path.join(work, 'tokens.json'), encoding='utf-8') as f:
    return np.asarray(json.load(f))


def sequential_of(case, work, params):
  """(the Sequential of case `case`, its leaves): frozen adapters of random values saved as
  our files and read back by the method, the trained adapter random too."""
  stacked, trained = OURS[case]
  paths = []
  for index, adapter in enumerate(stacked):
    paths.append(os.path.join(work, 'sources', case, str(index)))
    aj.peft.save_adapter(paths[-1], (adapter,), random_peft((adapter,), CONFIG, seed=index),
                         CONFIG)
  method = aj.peft.Sequential(adapters=tuple(paths), **trained).read_adapters(CONFIG)
  peft = aj.Llama(CONFIG, peft=(method,)).init_peft(jax.random.key(0), params)['peft']
  trained_leaves = random_peft((method,), CONFIG, seed=7)['sequential']
  return method, {'sequential': {**trained_leaves, 'frozen': peft['sequential']['frozen']}}


def export(work):
  params, tokens = export_base(work)
  for case in OURS:
    method, peft = sequential_of(case, work, params)
    aj.peft.save_adapter(os.path.join(work, 'ours', case), (method,), peft, CONFIG,
                         format='adapterhub')
    safetensors.numpy.save_file({'logits': logits(params, (method,), peft, tokens,
                                                  mask=mask_for(case))},
                                os.path.join(work, 'ours', f'{case}.logits.safetensors'))


def perturbed(peft, path):
  """`peft` with the one weight at `path` (keys, then an index) moved by 0.01 (a unit that
  relu keeps at zero for every token would not show: the weights here read live ones)."""
  *keys, index = path
  tree = jax.tree.map(np.array, peft)
  leaf = tree
  for key in keys:
    leaf = leaf[key]
  leaf[index] += 0.01
  return tree


def compare(work):
  params, tokens = base_params(work), read_tokens(work)
  theirs = safetensors.numpy.load_file(os.path.join(work, 'sequential_logits.safetensors'))
  theirs = {name: value * mask_for(name.split('/')[-1])[..., None]
            for name, value in theirs.items()}
  base = {case: logits(params, (), {}, tokens, mask=mask_for(case)) for case in ('', UNPADDED)}
  rows = [('base model', relative_error(base[''], theirs['base']), None)]
  checks = []  # (label, error): each error must exceed the tolerance
  for case, (stacked, trained) in OURS.items():
    ours = safetensors.numpy.load_file(os.path.join(work, 'ours', f'{case}.logits.safetensors'))
    rows.append((f'ours -> AdapterHub Stack {case}',
                 relative_error(ours['logits'], theirs[f'ours/{case}']),
                 relative_error(theirs[f'ours/{case}'], base[case if case == UNPADDED else ''])))
    # our AdapterHub files read back here: the same method and logits
    (method,), peft = aj.peft.load_adapter(os.path.join(work, 'ours', case), CONFIG)
    if method.stacked != tuple(stacked) or method.trained != B(**trained):
      sys.exit(f'our Stack {case} read back as {method.call_string()}')
    rows.append((f'ours -> AdapterHub files -> ours {case}', relative_error(
        logits(params, (method,), peft, tokens, mask=mask_for(case)), ours['logits']), None))
    if case == 'madx':  # one frozen weight of the language adapter moved
      moved = perturbed(peft, ('sequential', 'frozen', '0', 'mlp', 'up_bias', (1, 2)))
      checks.append((f'ours -> AdapterHub Stack {case}, one frozen weight moved by 0.01',
                     relative_error(logits(params, (method,), moved, tokens),
                                    theirs[f'ours/{case}'])))
  for case, (stacked, trained) in THEIRS.items():
    (method,), peft = aj.peft.load_adapter(os.path.join(work, 'theirs', case), CONFIG)
    if method.stacked != tuple(stacked) or method.trained != trained:
      sys.exit(f'AdapterHub Stack {case} read as {method.call_string()}')
    ours = logits(params, (method,), peft, tokens, mask=mask_for(case))
    rows.append((f'AdapterHub Stack {case} -> ours', relative_error(ours, theirs[f'theirs/{case}']),
                 relative_error(theirs[f'theirs/{case}'], base[case if case == UNPADDED else ''])))
    if case == 'madx':  # one weight of the trained (task) adapter moved
      moved = perturbed(peft, ('sequential', 'mlp', 'down', (1, 5, 2)))
      checks.append((f'AdapterHub Stack {case} -> ours, one trained weight moved by 0.01',
                     relative_error(logits(params, (method,), moved, tokens),
                                    theirs[f'theirs/{case}'])))
  parallel = relative_error(theirs['parallel/stack'], theirs['parallel/last'])
  for label, error, effect in rows:
    effect_text = '' if effect is None else f'   (the stack changes the logits by {effect:.2f})'
    print(f'{label:<46} max relative error {error:.1e}{effect_text}')
  for label, error in checks:
    print(f'{label}: max relative error {error:.1e} (must exceed {TOLERANCE:.0e})')
  print(f'AdapterHub Stack(par_a, par_b) against par_b alone: max relative error {parallel:.1e}')
  failed = [label for label, error, effect in rows
            if error > TOLERANCE or (effect is not None and effect < 1e-2)]
  failed += [label for label, error in checks if error <= TOLERANCE]
  if parallel > 1e-6:  # the reason Sequential refuses a parallel adapter
    failed.append('a parallel adapter in a Stack no longer discards the adapters before it')
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
  {'export': export, 'compare': compare}[sys.argv[1]](sys.argv[2])
