r"""Start one training run on every worker of a TPU pod, or as N processes on this machine.

    python -m additive_jax.launch tpu --tpu=NAME --zone=ZONE [--project=P] [--ref=REF] \
        -- --config=configs/sst2.py:lora --workdir=gs://bucket/run
    python -m additive_jax.launch local --processes=2 \
        -- --config=configs/sst2.py:lora,runlocal --workdir=/tmp/run
    python -m additive_jax.launch tpu --tpu=NAME --zone=ZONE --num_workers=4 --dry-run -- ...

Everything after `--` goes to `python -m additive_jax.main` unchanged, followed by
`--config.distributed=True` (and, locally, the flags that place each process).
Each process's output goes to its own log, LOGS/<tpu>/worker<i>.log or
LOGS/local/process<i>.log (--logs, default logs/), and process 0's also to the
terminal, its lines prefixed. When one process fails, the launcher stops the
others (a tpu run also kills the trainer on every worker) and exits with its
exit code, naming it and its log. `--dry-run` prints the commands it would run,
one a line, and runs nothing.

`tpu` ships a commit, not the working tree: `git archive` of HEAD (or --ref) is
copied to every worker (`gcloud compute tpus tpu-vm scp --worker=all`) and
unpacked into --repo_dir; uncommitted changes are not shipped (a dirty tree is
warned about). Then one `gcloud ... ssh --worker=<i>` per worker, all at once,
installs the project with its `tpu` extra (and any --pip packages) into a venv in
--repo_dir, kills this user's previous trainer and libtpu's lock, and starts the
trainer, where `jax.distributed.initialize()` finds its coordinator itself. The
worker count comes from `gcloud compute tpus tpu-vm describe`, or --num_workers.
Run it from the checkout's root: the trainer's paths (configs/...) are relative
to it there too.

`local` runs the same trainer as --processes processes here, with jax.distributed
on localhost:--port (a free one by default), each with one CPU device unless
XLA_FLAGS is set: a test of a multi-host run on one machine.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from additive_jax import command
from additive_jax import launch_backends as backends

_TPU = flags.DEFINE_string('tpu', None, 'tpu: the TPU VM (pod slice) name')
_ZONE = flags.DEFINE_string('zone', None, 'tpu: its zone')
_PROJECT = flags.DEFINE_string('project', None, "tpu: its project (default: gcloud's)")
_REF = flags.DEFINE_string('ref', 'HEAD', 'tpu: the commit to ship (committed files only)')
_REPO_DIR = flags.DEFINE_string('repo_dir', '~/additive_jax', "tpu: the checkout on each worker")
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'tpu: workers (default: gcloud describe)',
                                    lower_bound=1)
_PYTHON = flags.DEFINE_string('python', 'python3', "tpu: the workers' interpreter for the venv "
                              '(the project needs Python >= 3.11)')
_PIP = flags.DEFINE_multi_string('pip', [], 'tpu: another package for the venv, repeatable '
                                 '(gcsfs and google-cloud-storage for a gs:// workdir or data)')
_PROCESSES = flags.DEFINE_integer('processes', None, 'local: processes to start', lower_bound=1)
_PORT = flags.DEFINE_integer('port', 0, "local: the coordinator's port (0: a free one)")
_LOGS = flags.DEFINE_string('logs', 'logs', 'the logs go to LOGS/<tpu>/ or LOGS/local/')
_DRY_RUN = flags.DEFINE_bool('dry-run', False, 'print the commands, one a line; run nothing')

BACKEND_FLAGS = {'tpu': ('tpu', 'zone', 'project', 'ref', 'repo_dir', 'num_workers', 'python',
                         'pip'),
                 'local': ('processes', 'port')}
TAIL_LINES = 20  # of a failed process's log, printed with the error
STOP_TIMEOUT_S = 120  # an ssh to every worker of a pod
_TRAINER_ARGS: list[str] = []  # after the `--`, set before absl parses the rest


def split_trainer_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the launcher's argv, the trainer's args): the two sides of the first `--`."""
  if '--' not in argv:
    return argv, []
  cut = argv.index('--')
  return argv[:cut], argv[cut + 1:]


class LinePrefixer:
  """Puts `prefix` at the start of every line of a byte stream read in pieces (a `\r`, as a
  progress bar redraws its line, starts one too)."""

  def __init__(self, prefix: str):
    self.prefix, self.at_start = prefix.encode(), True

  def __call__(self, chunk: bytes) -> bytes:
    out = bytearray()
    for piece in re.split(rb'(?<=\n)|(?<=\r)(?!\n)', chunk):
      if piece:
        out += (self.prefix if self.at_start else b'') + piece
        self.at_start = piece.endswith((b'\n', b'\r'))
    return bytes(out)


def _pump(pipe, log_path: str, prefixer: LinePrefixer | None) -> None:
  """Copies a child's output to its log, and through `prefixer` to stdout; until it closes."""
  with open(log_path, 'wb') as log:
    while chunk := os.read(pipe.fileno(), 1 << 16):
      log.write(chunk)
      log.flush()
      if prefixer is not None:
        sys.stdout.buffer.write(prefixer(chunk))
        sys.stdout.flush()
  pipe.close()


def _stop(children: list[subprocess.Popen], grace_s: float = 3.0) -> None:
  """SIGTERM to each live child's process group (gcloud's ssh is a child of gcloud), SIGKILL
  to those still there after `grace_s`."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    for child in children:
      if child.poll() is None:
        try:
          os.killpg(child.pid, sig)
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + grace_s
    while any(c.poll() is None for c in children) and time.monotonic() < deadline:
      time.sleep(0.05)


def _tail(path: str, lines: int = TAIL_LINES) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def _first_failure(children: list[subprocess.Popen], poll_s: float) -> int | None:
  """The index of the first child to exit non-zero, or None once all exited 0."""
  while True:
    codes = [child.poll() for child in children]
    failed = next((i for i, code in enumerate(codes) if code), None)
    if failed is not None or None not in codes:
      return failed
    time.sleep(poll_s)


def supervise(commands: list[list[str]], logs: list[str], *, label: str = 'worker',
              stop: list[str] | None = None, poll_s: float = 0.1) -> int:
  """Runs the commands together, command i's output to logs[i] (i = 0's also to stdout).

  0 when every one exits 0. When one fails, the others are stopped (and `stop` run, to stop
  what they started elsewhere), and its exit code is returned (128 + N for a signal N) after
  an error naming it and its log."""
  for path in logs:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  children, pumps = [], []
  for i, (command, log) in enumerate(zip(commands, logs)):
    # Own session: a failure stops a child's whole group, and the terminal's Ctrl-C reaches the
    # launcher alone, which then stops them all the same way.
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    pump = threading.Thread(target=_pump, daemon=True, args=(
        child.stdout, log, LinePrefixer(f'[{label} {i}] ') if i == 0 else None))
    pump.start()
    children.append(child)
    pumps.append(pump)
  # A SIGTERM to the launcher stops them all, as Ctrl-C does, instead of orphaning them.
  previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
  failed, interrupted = None, False
  try:
    failed = _first_failure(children, poll_s)
  except KeyboardInterrupt:
    print(f'interrupted: stopping every {label}', file=sys.stderr)
    interrupted = True
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed is not None or interrupted:
    _stop(children)
    if stop is not None:
      print(f'stopping every {label}: {shlex.join(stop)}', file=sys.stderr)
      try:
        subprocess.run(stop, stdin=subprocess.DEVNULL, check=False, timeout=STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        print(f'the stop command did not end in {STOP_TIMEOUT_S} s', file=sys.stderr)
  for pump in pumps:
    pump.join(timeout=10)
  if interrupted:
    return 130
  if failed is None:
    return 0
  code = children[failed].returncode
  code = 128 - code if code < 0 else code
  tail = _tail(logs[failed]) if failed else ''  # process 0's lines are on the terminal already
  sys.stderr.write(f'{tail}error: {label} {failed} failed (exit code {code}); its log: '
                   f'{logs[failed]}\n')
  return code


def _git(*args: str) -> str:
  result = subprocess.run(['git', *args], capture_output=True, text=True)
  if result.returncode:
    sys.exit(f'error: git {" ".join(args)}: {result.stderr.strip()}')
  return result.stdout


def _check_checkout(ref: str, log_dir: str) -> None:
  """Exits unless this is the root of a checkout that has `ref`; warns when it has changes
  that the tarball of `ref` leaves out."""
  if _git('rev-parse', '--show-prefix').strip():
    sys.exit('error: run the tpu backend from the root of the checkout (git archive ships the '
             'whole tree, and the trainer\'s paths are relative to it)')
  sha = _git('rev-parse', '--verify', f'{ref}^{{commit}}').strip()
  # the launcher's own logs (and tarball) are no change of the checkout's
  ours = os.path.relpath(log_dir) + '/'
  changed = [line[3:] for line in _git('status', '--porcelain').splitlines()
             if not line[3:].startswith(ours)]
  if changed:
    print(f'warning: {len(changed)} uncommitted changes (e.g. {changed[0]}) are not shipped: '
          f'the workers get {ref} = {sha[:12]}', file=sys.stderr)


def _num_workers() -> int:
  if _NUM_WORKERS.value is not None:
    return _NUM_WORKERS.value
  if _DRY_RUN.value:
    sys.exit('error: --dry-run needs --num_workers: the count comes from gcloud describe, '
             'which a dry run does not run')
  command = backends.describe_command(_TPU.value, zone=_ZONE.value, project=_PROJECT.value)
  result = subprocess.run(command, capture_output=True, text=True)
  count = backends.count_workers(result.stdout)
  if result.returncode or not count:
    sys.exit(f'error: {shlex.join(command)} found no workers: {result.stderr.strip()}')
  return count


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _check_flags(backend: str) -> None:
  for other, names in BACKEND_FLAGS.items():
    for name in names:
      if other != backend and flags.FLAGS[name].present:
        sys.exit(f'error: --{name} is a flag of the {other} backend, not of {backend}')
  if backend == 'tpu' and not (_TPU.value and _ZONE.value):
    sys.exit('error: tpu needs --tpu=NAME and --zone=ZONE')
  if backend == 'local' and _PROCESSES.value is None:
    sys.exit('error: local needs --processes=N')


def main(argv):
  backend = argv[1:]
  if backend not in (['tpu'], ['local']):
    sys.exit(f'error: give one backend, tpu or local (not {" ".join(backend) or "none"}), '
             "then -- and the trainer's args")
  backend = backend[0]
  _check_flags(backend)
  if not _TRAINER_ARGS:
    sys.exit("error: give the trainer's args after --, e.g. -- --config=configs/sst2.py "
             '--workdir=DIR')
  log_dir = os.path.join(_LOGS.value, _TPU.value if backend == 'tpu' else 'local')
  setup, stop = [], None
  if backend == 'tpu':
    if not _DRY_RUN.value:
      _check_checkout(_REF.value, _LOGS.value)
    setup, workers, stop = backends.tpu_commands(
        _TPU.value, _TRAINER_ARGS, zone=_ZONE.value, project=_PROJECT.value, ref=_REF.value,
        repo_dir=_REPO_DIR.value, python=_PYTHON.value, num_workers=_num_workers(),
        log_dir=log_dir, extra_packages=_PIP.value)
  else:
    workers = backends.local_commands(_TRAINER_ARGS, processes=_PROCESSES.value,
                                      port=_PORT.value or _free_port(), python=sys.executable,
                                      environ=dict(os.environ))
  label = 'worker' if backend == 'tpu' else 'process'
  logs = [os.path.join(log_dir, f'{label}{i}.log') for i in range(len(workers))]
  if _DRY_RUN.value:
    print('\n'.join(shlex.join(command) for command in setup + workers))
    if stop is not None:
      print(f'# when a worker fails: {shlex.join(stop)}')
    return
  os.makedirs(log_dir, exist_ok=True)
  for command in setup:
    print(f'running: {shlex.join(command)}', file=sys.stderr)
    if code := subprocess.run(command, stdin=subprocess.DEVNULL).returncode:
      sys.exit(f'error: {shlex.join(command[:5])} ... failed (exit code {code})')
  print(f'starting {len(workers)} {label}s, logs: {log_dir}/{label}<i>.log', file=sys.stderr)
  sys.exit(supervise(workers, logs, label=label, stop=stop))


if __name__ == '__main__':
  sys.argv, _TRAINER_ARGS = split_trainer_args(sys.argv)
  command.run(main)
