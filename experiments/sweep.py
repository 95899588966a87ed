"""Run a sweep file: every point a trainer run in its own workdir under one root.

    python -m experiments.sweep --config=configs/sweeps/small.py [--dry-run] [--shard=i/n] \
        [--root=DIR]

A sweep file (configs/sweeps/) names the experiment config its points start from (`BASE`)
and returns its points from `get_hyper(hyper)` (experiments/hyper.py: sweep, fixed, product,
zip, chain over the config argument `arg` and any `config.<key>`); `--config=FILE:ARG` passes
ARG as `get_hyper(hyper, arg)`. Each point runs as

    python -m additive_jax.main --config=BASE:ARG --workdir=ROOT/NAME --config.KEY=VALUE ...

in the root (default `runs/<sweep name>`, any epath: `gs://...`). A point whose workdir
holds a summary is done and skipped; an interrupted one resumes from its checkpoint (the
trainer does that); a failing one (non-zero exit) is recorded in `NAME/sweep_failure.json`
with its output's tail and the sweep goes on (a later sweep retries it). SIGTERM stops the
run in flight at a checkpoint (the trainer's preemption) and then the sweep. `--shard=i/n`
runs the points i, i+n, i+2n, ... (i from 0), so that n machines split one sweep; each
writes `ROOT/sweep.json`, the points and their status, which `experiments/report.py` reads.
"""

from __future__ import annotations

import collections
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags
from etils import epath

from additive_jax.train.workdir import RunFolder
from experiments import hyper

FAILURE = 'sweep_failure.json'


def load_sweep(spec: str) -> tuple[str, list[dict], str | None]:
  """(base config file, points, arg) of a sweep file `FILE[:ARG]`."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec}: no sweep file {path}')
  module_spec = importlib.util.spec_from_file_location('sweep_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for name in ('BASE', 'get_hyper'):
    if not hasattr(module, name):
      raise ValueError(f'{path} defines no {name} (a sweep file has BASE and get_hyper(hyper))')
  takes_arg = len(inspect.signature(module.get_hyper).parameters) > 1
  if arg and not takes_arg:
    raise ValueError(f'--config={spec}: get_hyper of {path} takes no argument')
  points = module.get_hyper(hyper, arg or None) if takes_arg else module.get_hyper(hyper)
  if not points:
    raise ValueError(f'{path}: get_hyper returned no points')
  return module.BASE, points, arg or None


def point_names(points: list[dict]) -> list[str]:
  """A workdir name per point from the values that vary over the sweep: `lora_rank=4_seed=1`
  (a key by its last part, `lr` for a learning rate); unique, or an error."""
  varying = {k for p in points for k in p if len({repr(q.get(k)) for q in points}) > 1}
  names = []
  for point in points:
    if point.get('name'):
      names.append(point['name'])
      continue
    keys = [k for k in point if k in varying and k not in hyper.POINT_KEYS]  # the point's order
    lasts = collections.Counter(_short(k) for k in keys)
    parts = [os.path.splitext(os.path.basename(point.get('base', 'base')))[0]] if 'base' in varying else []
    parts += [point['arg'].replace(',', '+')] if point.get('arg') else []
    parts += [f'{_short(k) if lasts[_short(k)] == 1 else k.removeprefix("config.")}='
              f'{_text(point[k])}' for k in keys]
    names.append(re.sub(r'[^A-Za-z0-9_.=+-]+', '-', '_'.join(parts)) or 'default')
  repeated = [n for n, count in collections.Counter(names).items() if count > 1]
  if repeated:
    raise ValueError(f'points with the same values: {repeated}')
  return names


def _short(key: str) -> str:
  last = key.rsplit('.', 1)[-1]
  return {'learning_rate': 'lr'}.get(last, last)


def _text(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def command(base: str, point: dict, workdir: epath.Path) -> list[str]:
  arg = f':{point["arg"]}' if point.get('arg') else ''
  root = str(workdir.parent)  # `{root}` in a value: the sweep's root (an earlier point's run)
  return [sys.executable, '-m', 'additive_jax.main', f'--config={point.get("base", base)}{arg}',
          f'--workdir={workdir}'] + [f'--{key}={_text(_rooted(value, root))}'
                                     for key, value in point.items()
                                     if key not in hyper.POINT_KEYS]


def _rooted(value, root: str):
  """`value` with `{root}` replaced in its text, or in each text of a tuple or list."""
  if isinstance(value, str):
    return value.replace('{root}', root)
  if isinstance(value, (tuple, list)):
    return type(value)(_rooted(v, root) for v in value)
  return value


def status(workdir: epath.Path) -> str:
  folder = RunFolder(workdir)
  if folder.summary.exists():
    return 'done'
  if (workdir / FAILURE).exists():
    return 'failed'
  return 'interrupted' if folder.checkpoints.exists() else 'pending'


def shard_of(text: str) -> tuple[int, int]:
  found = re.fullmatch(r'(\d+)/(\d+)', text)
  if not found or not int(found.group(1)) < int(found.group(2)):
    raise app.UsageError(f'--shard={text}: expected i/n with 0 <= i < n, e.g. 0/2')
  return int(found.group(1)), int(found.group(2))


class Stop:
  """SIGTERM: passed on to the run in flight (which saves a checkpoint and exits 0), and the
  sweep stops after it."""

  def __init__(self):
    self.requested, self.child = False, None
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)


def run_point(argv: list[str], workdir: epath.Path, stop: Stop) -> str:
  """Runs one point, its output passed through; returns its status after."""
  print('$', shlex.join(argv), flush=True)
  tail = collections.deque(maxlen=40)
  stop.child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in stop.child.stdout:
    sys.stdout.write(line)
    tail.append(line)
  returncode = stop.child.wait()
  stop.child = None
  failure = workdir / FAILURE
  if returncode != 0 and stop.requested:  # killed by the SIGTERM passed on (after its last step,
    return 'stopped'                      # where the trainer no longer catches it): not a failure
  if returncode == 0:
    if failure.exists():
      failure.unlink()
    return status(workdir) if RunFolder(workdir).summary.exists() else 'stopped'
  workdir.mkdir(parents=True, exist_ok=True)
  failure.write_text(json.dumps({'returncode': returncode, 'command': argv, 'time': time.time(),
                                 'output_tail': ''.join(tail)}, indent=2), encoding='utf-8')
  return 'failed'


def write_index(root: epath.Path, sweep: str, base: str, arg, points, names) -> None:
  """ROOT/sweep.json: every point of the sweep and its status now (on any shard)."""
  listed = [{'name': name, 'arg': point.get('arg'), 'base': point.get('base', base),
             'workdir': str(root / name),
             'overrides': {k.removeprefix('config.'): v for k, v in point.items()
                           if k not in hyper.POINT_KEYS},
             'status': status(root / name)} for point, name in zip(points, names)]
  staged = root / f'sweep.json.{os.getpid()}.tmp'
  staged.write_text(json.dumps({'sweep': sweep, 'arg': arg, 'base': base, 'points': listed},
                               indent=2), encoding='utf-8')
  staged.replace(root / 'sweep.json')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  options = flags.FLAGS
  index, count = shard_of(options.shard)
  try:
    base, points, arg = load_sweep(options.config)
    names = point_names(points)
  except ValueError as err:
    sys.exit(f'error: {err}')
  sweep_file = options.config.partition(':')[0]
  default = os.path.join('runs', os.path.splitext(os.path.basename(sweep_file))[0] +
                         (f'_{arg}' if arg else ''))
  root = epath.Path(options.root or default)
  mine = list(range(index, len(points), count))
  print(f'{len(points)} points; shard {index}/{count}: {len(mine)} of them; root {root}')
  if options['dry-run'].value:
    for i in mine:
      print(f'{names[i]}  [{status(root / names[i])}]  {root / names[i]}\n  $ '
            f'{shlex.join(command(base, points[i], root / names[i]))}')
    return
  root.mkdir(parents=True, exist_ok=True)
  stop, outcome = Stop(), {}
  for i in mine:
    workdir = root / names[i]
    outcome[names[i]] = status(workdir)
    if outcome[names[i]] != 'done':
      write_index(root, sweep_file, base, arg, points, names)
      outcome[names[i]] = run_point(command(base, points[i], workdir), workdir, stop)
    if stop.requested or outcome[names[i]] == 'stopped':
      break
  write_index(root, sweep_file, base, arg, points, names)
  print('\n'.join(f'{state:>11}  {name}' for name, state in outcome.items()))
  failed = [name for name, state in outcome.items() if state == 'failed']
  if failed:
    sys.exit(f'{len(failed)} failed: {", ".join(failed)} (see NAME/{FAILURE}; rerun to retry)')


if __name__ == '__main__':
  # flags only as a command, so that tests can import this beside modules owning --dry-run
  flags.DEFINE_string('config', None, 'the sweep file, FILE or FILE:ARG', required=True)
  flags.DEFINE_string('root', None, 'workdirs go under here; default runs/<sweep name>')
  flags.DEFINE_bool('dry-run', False, 'print every point, its workdir and command')
  flags.DEFINE_string('shard', '0/1', 'i/n: run the points i, i+n, ... of this sweep')
  app.run(main)
