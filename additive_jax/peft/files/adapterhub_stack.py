"""A Sequential (peft/sequential.py) as AdapterHub files: a Stack, one adapter directory each.

AdapterHub keeps no file of a `Stack`: it is a composition of adapters saved apart, activated
together (`model.set_active_adapters(Stack('lang', 'task'))`). A Sequential of n frozen
adapters and its trained one is written as n + 1 AdapterHub adapter directories

    <directory>/0/   the first frozen adapter (adapter_config.json + adapter.safetensors)
    …
    <directory>/n/   the trained adapter, last in the Stack

each a seq_bn or double_seq_bn adapter (adapterhub.py) named `sequential_<i>`, so that all
load into one model side by side: `model.load_adapter('<directory>/0')` … then
`Stack('sequential_0', …, 'sequential_n')`. Reading takes such a directory, whoever wrote it
(AdapterHub's own adapters saved to 0 … n, any names), as the Sequential of the last adapter
trained on top of the others, read frozen from their directories.
"""

from __future__ import annotations

import os

from etils import epath

from additive_jax.peft.files import adapterhub
from additive_jax.peft.files.file_io import AdapterFileError
from additive_jax.peft.registry import class_for_key

KEY = 'sequential'   # Sequential's key (imported by name: peft/sequential.py reads files itself)
FROZEN = 'frozen'    # its subtree of frozen adapters, {'0': leaves, …}


def holds_stack(methods) -> bool:
  """Whether `methods` is one Sequential, written here as a Stack of directories."""
  return len(methods) == 1 and methods[0].key == KEY


def is_stack_directory(directory: str) -> bool:
  """Whether `directory` holds no adapter itself but AdapterHub adapters in 0/, 1/, …"""
  folder = epath.Path(directory)
  return (not (folder / adapterhub.CONFIG_NAME).exists() and
          (folder / '0' / adapterhub.CONFIG_NAME).exists())


def save(directory, method, tree, config, base_model_name_or_path=None) -> None:
  chain = (*method.stacked, method.trained)
  trees = [tree[FROZEN][str(i)] for i in range(len(method.stacked))]
  trees.append({site: leaves for site, leaves in tree.items() if site != FROZEN})
  for index, (adapter, leaves) in enumerate(zip(chain, trees)):
    place = os.path.join(directory, str(index))
    epath.Path(place).mkdir(parents=True, exist_ok=True)
    adapterhub.save(place, (adapter,), {adapter.key: leaves}, config, base_model_name_or_path,
                    name=f'{KEY}_{index}')


def load(directory, config, allow_pickle=False):
  """((the Sequential,), {'sequential': leaves}) from the adapter directories 0, 1, … in
  `directory`, the last one trained."""
  folder = epath.Path(directory)
  places = []
  while (folder / str(len(places))).is_dir():
    places.append(str(folder / str(len(places))))
  others = sorted(p.name for p in folder.iterdir() if p.is_dir() and
                  p.name not in {str(i) for i in range(len(places))})
  if len(places) < 2 or others:
    raise AdapterFileError(f'{directory}: a Stack is AdapterHub adapter directories 0, 1, … (at '
                           f'least two: the last one trains), found {len(places)} numbered'
                           + (f' and {others}' if others else ''))
  methods, trees = [], []
  for place in places:
    found, peft = adapterhub.load(place, config, allow_pickle)
    if len(found) != 1 or found[0].key != 'bottleneck':
      raise AdapterFileError(f'{place} holds {", ".join(m.call_string() for m in found)}; a '
                             'Stack read here holds bottleneck adapters only')
    methods.append(found[0])
    trees.append(peft[found[0].key])
  last = methods[-1]
  try:
    method = class_for_key(KEY)(
        adapters=tuple(places[:-1]), adapter_methods=tuple(m.call_string() for m in methods[:-1]),
        dim=last.dim, placement=last.placement, activation=last.activation, scale=last.scale,
        gate=last.gate)
  except ValueError as err:
    raise AdapterFileError(f'{directory}: {err}') from None
  return (method,), {KEY: {FROZEN: {str(i): t for i, t in enumerate(trees[:-1])}, **trees[-1]}}
