"""The quickstart's wall time, as the README types it, on the machine this runs on.

    .venv/bin/python benchmarks/quickstart.py [--out=benchmarks/results/quickstart_cpu.json]

Runs `python -m additive_jax.main --config=configs/sst2.py --workdir=<a new folder>`
from the checkout (after installation: the embedded default already downloaded, the
data prepared by an earlier run or not, as `prepared_before` says), and records its
wall time, the accuracy before and after it prints, its median step time (from the
run's own metrics) and the machine (`machine.py`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import machine as machine_lib  # beside this file, on the path of a script run from here

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_OUT = flags.DEFINE_string('out', os.path.join(HERE, 'results', 'quickstart_cpu.json'),
                           'JSON results')


def main(argv):
  del argv
  machine = machine_lib.describe()
  with tempfile.TemporaryDirectory() as workdir:
    argv = [sys.executable, '-m', 'additive_jax.main', '--config=configs/sst2.py',
            f'--workdir={workdir}/run']
    started = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    with open(os.path.join(workdir, 'run', 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  record = {'command': 'python -m additive_jax.main --config=configs/sst2.py --workdir=DIR',
            'wall_s': wall, 'accuracy_before': summary['accuracy_before'],
            'accuracy_after': summary['accuracy_after'], 'tokens_per_s': summary['tokens_per_s'],
            'trainable_params': summary['trainable_params'],
            'output': [line for line in out.stdout.splitlines() if re.search(r'\w', line)],
            'machine': {**machine, 'load_average_after': os.getloadavg()},
            'date': time.strftime('%Y-%m-%d')}
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
  print(machine_lib.caption(machine))
  print(f'quickstart: {wall:.0f} s, accuracy {record["accuracy_before"]:.4f} -> '
        f'{record["accuracy_after"]:.4f}, {record["tokens_per_s"]:.0f} tokens/s')
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
