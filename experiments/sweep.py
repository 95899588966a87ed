"""Run an experiment config over several variants and tabulate (and plot) their summaries.

    .venv/bin/python experiments/sweep.py --config=configs/sst2.py --variants=pfeiffer,houlsby,lora \
        --root=/tmp/sst2_sweep --out=experiments/results/sst2_methods
    .venv/bin/python experiments/sweep.py --config=configs/sst2.py --variants=pfeiffer \
        --override=peft.bottleneck.dim=16 --override=peft.bottleneck.dim=64 ...

Each variant is the config's argument (a method preset, or several joined by
'+': `ia3+prefix`), each `--override` a `key=value` the run gets on top; the
sweep is their product. `--set key=value` goes to every run. Every run is `python -m additive_jax.main` in its own
workdir under `--root` (a finished run is not repeated: rerunning a sweep
resumes or skips), and its `summary.json` is collected into `<out>.json`, a
Markdown table `<out>.md` and a bar plot `<out>.png` of the accuracy before
and after (or the final eval loss when the config scores no accuracy).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

from absl import app, flags
from etils import epath
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

_CONFIG = flags.DEFINE_string('config', None, 'experiment config file', required=True)
_VARIANTS = flags.DEFINE_list('variants', [], "config arguments; '+' joins methods")
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'key=value for every variant, one run each')
_EXTRA = flags.DEFINE_string('extra', '', 'appended to every config argument, e.g. runlocal')
_SET = flags.DEFINE_multi_string('set', [], 'key=value given to every run (not swept)')
_ROOT = flags.DEFINE_string('root', None, 'workdirs of the runs go under here', required=True)
_OUT = flags.DEFINE_string('out', None, 'results path without extension', required=True)


def run_name(variant: str, override: str | None) -> str:
  name = variant + (f'__{override}' if override else '')
  return re.sub(r'[^A-Za-z0-9_.=+-]+', '_', name).strip('_')


def run(variant: str, override: str | None) -> dict:
  """One run's summary (running it unless its workdir already holds one)."""
  workdir = epath.Path(_ROOT.value) / run_name(variant, override)
  summary_path = workdir / 'summary.json'
  if not summary_path.exists():
    arg = ','.join(filter(None, [variant.replace('+', ','), _EXTRA.value]))
    command = [sys.executable, '-m', 'additive_jax.main', f'--config={_CONFIG.value}:{arg}',
               f'--workdir={workdir}'] + [f'--config.{s}' for s in _SET.value]
    command += [f'--config.{override}'] if override else []
    print('$', ' '.join(command), flush=True)
    subprocess.run(command, check=True)
  return {'variant': variant, 'override': override, **json.loads(summary_path.read_text())}


def table(results: list[dict]) -> str:
  columns = ['variant', 'override', 'trainable_params', 'trainable_percent', 'accuracy_before',
             'accuracy_after', 'eval_loss', 'wall_time_s']
  columns = [c for c in columns if any(r.get(c) is not None for r in results)]
  fmt = {'trainable_params': '{:,}', 'trainable_percent': '{:.3f}%', 'accuracy_before': '{:.4f}',
         'accuracy_after': '{:.4f}', 'eval_loss': '{:.4f}', 'wall_time_s': '{:.0f}'}
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in results:
    cells = [fmt.get(c, '{}').format(r[c]) if r.get(c) is not None else '' for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(results: list[dict], path: str) -> None:
  names = [run_name(r['variant'], r['override']) for r in results]
  figure, axes = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.5))
  if all('accuracy_after' in r for r in results):
    width = 0.4
    positions = range(len(names))
    axes.bar([p - width / 2 for p in positions], [r.get('accuracy_before', 0) for r in results],
             width, label='before')
    axes.bar([p + width / 2 for p in positions], [r['accuracy_after'] for r in results], width,
             label='after')
    axes.set_ylabel('accuracy')
    axes.legend()
  else:
    axes.bar(names, [r['eval_loss'] for r in results])
    axes.set_ylabel('eval loss')
  axes.set_xticks(range(len(names)), names, rotation=30, ha='right')
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  variants = _VARIANTS.value or ['']
  results = [run(v, o) for v, o in itertools.product(variants, _OVERRIDES.value or [None])]
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + '.json', 'w', encoding='utf-8') as f:
    json.dump({'config': _CONFIG.value, 'extra': _EXTRA.value, 'runs': results}, f, indent=2)
  markdown = table(results)
  with open(_OUT.value + '.md', 'w', encoding='utf-8') as f:
    f.write(markdown + '\n')
  plot(results, _OUT.value + '.png')
  print(markdown)


if __name__ == '__main__':
  app.run(main)
