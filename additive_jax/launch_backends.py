"""The commands `python -m additive_jax.launch` runs: pure functions of its flags, run nothing.

Both backends start the same trainer, `python -m additive_jax.main <trainer args>
--config.distributed=True`, once per process of the run; the local backend adds
the flags that place a process (`--coordinator_address`, `--num_processes`,
`--process_id`), which on a TPU pod `jax.distributed.initialize()` finds itself.

On a TPU worker the trainer runs at the end of one shell command
(`worker_command`): unpack the shipped tarball, install the project with
its `tpu` extra into a venv, kill what is left of this user's previous run and its
libtpu lock, `exec` the trainer. The tests run that same string here with the
install and the lock clearing switched off.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

LIBTPU_RELEASES = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
# The checkout's tarball's name in a worker's home (here: checkout.tar.gz beside the logs).
REMOTE_TARBALL = 'additive_jax_checkout.tar.gz'
# A trainer of this user's: `<...>python<...> -m additive_jax.main ...` (what `worker_command`
# execs). Anchored at the start of the command line, so the `bash -c '... additive_jax.main ...'`
# that runs a worker command (the kill's own included) never matches.
TRAINER_PATTERN = '^[^ ]*python[^ ]* -m additive_jax[.]main( |$)'
# The trainer takes SIGTERM as a preemption (finish the step, save, exit 0), which a run that
# lost a worker cannot do: SIGKILL, then wait (at most 10 s) for the processes to be gone.
KILL_RUN = (f"pkill -KILL -u \"$(id -u)\" -f '{TRAINER_PATTERN}'; "
            f"for _ in $(seq 50); do pgrep -u \"$(id -u)\" -f '{TRAINER_PATTERN}' >/dev/null "
            "|| break; sleep 0.2; done")
# A previous run's trainer holds the TPU, and a killed one leaves libtpu's lock file behind.
# Another user's process is left alone: libtpu then names it in its "TPU in use" error.
CLEAR_LOCK = f'{{ {KILL_RUN}; }} && sudo rm -f /tmp/libtpu_lockfile'


# The project with its `tpu` extra: jax[tpu] in the project's own jax range (setup.py), so a
# pod installs what a TPU user installs by hand.
TPU_INSTALL = '.[tpu]'


def trainer_command(python: str, trainer_args: Sequence[str],
                    process_flags: Sequence[str] = ()) -> list[str]:
  return [python, '-m', 'additive_jax.main', *trainer_args, '--config.distributed=True',
          *process_flags]


def shell_path(path: str) -> str:
  """`path` quoted for a remote shell, with a leading `~/` left for it to expand."""
  if path == '~' or path.startswith('~/'):
    return '~' + (('/' + shlex.quote(path[2:])) if path[2:] else '')
  return shlex.quote(path)


def worker_command(trainer_args: Sequence[str], *, repo_dir: str, python: str = 'python3',
                   tarball: str | None = '~/' + REMOTE_TARBALL, install: bool = True,
                   clear_lock: bool = True, process_flags: Sequence[str] = (),
                   extra_packages: Sequence[str] = ()) -> str:
  """The shell command that starts one worker's process of the run, from `repo_dir`.

  tarball: the checkout to unpack into repo_dir first (over what is there: the venv stays,
    and a file the shipped commit deleted lingers); None to run repo_dir as it is.
  install: `python -m venv .venv` and pip-install the project with its `tpu` extra (and
    `extra_packages`) there, then run the venv's python; False: run `python` as it is.
  clear_lock: kill this user's previous trainer and remove libtpu's lock (needs sudo).
  process_flags: appended to the trainer's flags (a local run's coordinator flags)."""
  directory = shell_path(repo_dir)
  steps = []
  if tarball is not None:
    steps += [f'mkdir -p {directory}', f'tar -xzf {shell_path(tarball)} -C {directory}']
  steps.append(f'cd {directory}')
  if install:
    steps += [f'{shlex.quote(python)} -m venv .venv',
              shlex.join(['.venv/bin/python', '-m', 'pip', 'install', '-q', TPU_INSTALL,
                          *extra_packages, '-f', LIBTPU_RELEASES])]
    python = '.venv/bin/python'
  if clear_lock:
    steps.append(CLEAR_LOCK)
  # unbuffered: the launcher streams and logs the output as it is written, not at exit
  steps.append('PYTHONUNBUFFERED=1 exec ' +
               shlex.join(trainer_command(python, trainer_args, process_flags)))
  return ' && '.join(steps)


def gcloud(verb: str, *args: str, zone: str, project: str | None) -> list[str]:
  """`gcloud compute tpus tpu-vm <verb> <args> --zone=Z [--project=P]`."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, f'--zone={zone}',
          *([f'--project={project}'] if project else [])]


def describe_command(tpu: str, *, zone: str, project: str | None) -> list[str]:
  """Prints one IP address per worker, separated by ';' (gcloud's list separator)."""
  return gcloud('describe', tpu, '--format=value(networkEndpoints[].ipAddress)', zone=zone,
                project=project)


def count_workers(describe_output: str) -> int:
  return len([ip for ip in re.split(r'[;,\s]+', describe_output) if ip])


def tpu_commands(tpu: str, trainer_args: Sequence[str], *, zone: str, project: str | None,
                 ref: str, repo_dir: str, python: str, num_workers: int, log_dir: str,
                 extra_packages: Sequence[str] = ()):
  """(the setup commands, one after another; one command per worker; the stop command, run on
  every worker when one fails). The tarball of `ref` goes to log_dir, beside the logs."""
  tarball = os.path.join(log_dir, 'checkout.tar.gz')
  setup = [['git', 'archive', '--format=tar.gz', f'--output={tarball}', ref],
           gcloud('scp', tarball, f'{tpu}:{REMOTE_TARBALL}', '--worker=all', zone=zone,
                  project=project)]
  command = worker_command(trainer_args, repo_dir=repo_dir, python=python,
                           extra_packages=extra_packages)
  workers = [gcloud('ssh', tpu, f'--worker={i}', f'--command={command}', zone=zone,
                    project=project) for i in range(num_workers)]
  stop = gcloud('ssh', tpu, '--worker=all', f'--command={KILL_RUN}', zone=zone, project=project)
  return setup, workers, stop


def local_commands(trainer_args: Sequence[str], *, processes: int, port: int, python: str,
                   environ: dict[str, str]) -> list[list[str]]:
  """One command per process, through `env` for what the launcher sets in their environment:
  one CPU device each unless the caller set XLA_FLAGS, and unbuffered output."""
  settings = ['PYTHONUNBUFFERED=1']
  if 'XLA_FLAGS' not in environ:
    settings.insert(0, 'XLA_FLAGS=--xla_force_host_platform_device_count=1')
  return [['env', *settings, *trainer_command(
              python, trainer_args, [f'--coordinator_address=localhost:{port}',
                                     f'--num_processes={processes}', f'--process_id={i}'])]
          for i in range(processes)]
