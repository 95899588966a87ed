"""AdapterHub's side of the averaging cross-check (tests/test_peft_average.py); runs in the
AdapterHub venv (adapters 1.3.0, transformers 4.57).

    average_side.py WORK

Loads the shared base (WORK/base), then for each case of WORK/cases.json
  {"<case>": {"inputs": [dir, ...], "weights": [...] | null, "combine_strategy": "linear",
              "normalize_weights": true, "svd_rank": null}}
loads the input adapters (our AdapterHub files) as <case>_0, <case>_1, ..., every tensor used
and none missing, averages them with `model.average_adapter(<case>, ...)` and saves the
average to WORK/theirs/<case> (adapterhub_side.save_theirs: safetensors, a prefix's pool
aliases left out).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # even under PYTHONSAFEPATH
from adapterhub_side import base_model, save_theirs  # noqa: E402


def load_as(model, directory, name):
  """Our adapter file under `name`; a missing or unused tensor ends the run (a prefix's
  per-layer pool aliases excepted: adapterhub_prefix_lora.py)."""
  info = {}
  model.load_adapter(directory, load_as=name, use_safetensors=True, loading_info=info)
  missing = [k for k in info['missing_keys'] if '.prefix_tuning.pool.' not in k]
  if missing or info['unexpected_keys']:
    sys.exit(f'{directory}: missing {missing}, unexpected {info["unexpected_keys"]}')


def main(work):
  model = base_model(os.path.join(work, 'base'))
  os.makedirs(os.path.join(work, 'theirs'), exist_ok=True)
  with open(os.path.join(work, 'cases.json'), encoding='utf-8') as f:
    cases = json.load(f)
  for case, spec in cases.items():
    names = [f'{case}_{index}' for index in range(len(spec['inputs']))]
    for name, directory in zip(names, spec['inputs']):
      load_as(model, directory, name)
    model.average_adapter(case, names, weights=spec['weights'],
                          combine_strategy=spec['combine_strategy'],
                          normalize_weights=spec['normalize_weights'], svd_rank=spec['svd_rank'])
    save_theirs(model, os.path.join(work, 'theirs', case), case)
    for name in names + [case]:
      model.delete_adapter(name)
    print(f'{case}: averaged {len(names)} adapters ({spec["combine_strategy"]})')


if __name__ == '__main__':
  main(sys.argv[1])
