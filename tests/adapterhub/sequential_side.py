"""AdapterHub's side of the Sequential cross-check (sequential_jax.py says the steps); runs in the
AdapterHub venv (transformers 4.57).

    sequential_side.py WORK

Loads the shared base (WORK/base) and
  * each of our Sequentials (WORK/ours/<case>/<i>, one AdapterHub adapter per directory, i the
    place in the stack): loads every adapter (no tensor missing or unused) and activates
    `Stack(adapter 0, adapter 1, …)`; its logits are kept;
  * builds its own stacks (THEIRS), every adapter weight random (N(0, 0.2²)), keeps their
    logits and saves each adapter to WORK/theirs/<case>/<i>;
  * two parallel adapters: the logits of `Stack(par_a, par_b)` and of `par_b` alone (a parallel
    adapter in a Stack discards what the adapters before it added, the reason our Sequential
    refuses one).
All logits go to WORK/sequential_logits.safetensors ('base', 'ours/<case>', 'theirs/<case>',
'parallel/stack', 'parallel/last').
"""

import os
import sys

import adapters
from adapters.composition import Stack
import safetensors.numpy
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH
from adapterhub_side import MODULES, load_ours, logits, read_inputs, save_theirs  # noqa: E402

THEIRS = {
    # MAD-X: a wide language adapter under a narrow task adapter, both Pfeiffer
    'madx': [('lang', adapters.SeqBnConfig(reduction_factor=2)),
             ('task', adapters.SeqBnConfig(reduction_factor=16, non_linearity='gelu'))],
    # Houlsby and Pfeiffer adapters mixed, at both sites, with scalings
    'mixed': [('first', adapters.DoubleSeqBnConfig(reduction_factor=12, non_linearity='swish')),
              ('second', adapters.SeqBnConfig(reduction_factor=8, scaling=0.5)),
              ('third', adapters.DoubleSeqBnConfig(reduction_factor=16, non_linearity='relu',
                                                          scaling=2.0))],
    # a gated (UniPELT-style) adapter in the stack; unpadded (sequential_jax.UNPADDED)
    'gated': [('lang', adapters.SeqBnConfig(reduction_factor=4, use_gating=True)),
              ('task', adapters.SeqBnConfig(reduction_factor=6, non_linearity='gelu'))],
}
UNPADDED = 'gated'


def randomize(model, name, generator):
  with torch.no_grad():
    for weight_name, weight in model.named_parameters():
      if any(f'.{part}.{name}.' in weight_name for part in MODULES):
        weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))


def stack_logits(model, names, tokens, mask, case):
  model.set_active_adapters(Stack(*names))
  return logits(model, tokens, torch.ones_like(mask) if UNPADDED in case else mask)


def main(work):
  model, tokens, mask = read_inputs(work)
  out = {'base': logits(model, tokens, mask)}
  for case in sorted(os.listdir(os.path.join(work, 'ours'))):
    directory = os.path.join(work, 'ours', case)
    if not os.path.isdir(directory):
      continue
    places = sorted(os.listdir(directory), key=int)
    if places != [str(i) for i in range(len(places))]:
      sys.exit(f'{directory}: expected directories 0…{len(places) - 1}, got {places}')
    names = [load_ours(model, os.path.join(directory, place)) for place in places]
    if len(set(names)) != len(names):
      sys.exit(f'{directory}: adapter names {names} are not distinct')
    out[f'ours/{case}'] = stack_logits(model, names, tokens, mask, case)
    for name in names:
      model.delete_adapter(name)
  generator = torch.Generator().manual_seed(0)
  for case, stack in THEIRS.items():
    names = [f'{case}_{name}' for name, _ in stack]
    for name, (_, config) in zip(names, stack):
      model.add_adapter(name, config=config)
      randomize(model, name, generator)
    out[f'theirs/{case}'] = stack_logits(model, names, tokens, mask, case)
    os.makedirs(os.path.join(work, 'theirs', case))
    for place, name in enumerate(names):
      save_theirs(model, os.path.join(work, 'theirs', case, str(place)), name)
      model.delete_adapter(name)
  for name in ('par_a', 'par_b'):
    model.add_adapter(name, config=adapters.ParBnConfig(reduction_factor=8))
    randomize(model, name, generator)
  out['parallel/stack'] = stack_logits(model, ['par_a', 'par_b'], tokens, mask, 'parallel')
  out['parallel/last'] = stack_logits(model, ['par_b'], tokens, mask, 'parallel')
  safetensors.numpy.save_file(out, os.path.join(work, 'sequential_logits.safetensors'))


if __name__ == '__main__':
  main(sys.argv[1])
