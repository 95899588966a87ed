"""Train (and evaluate) one experiment config.

    python -m additive_jax.main --config=configs/sst2.py[:arg] --workdir=DIR [--config.key=value]

The config is an ml_collections `get_config(arg)` file (see configs/); any key
can be overridden on the command line, and a key the config does not have is
refused before anything runs. Rerunning with the same workdir resumes from its
latest checkpoint, also after SIGTERM (exit 0) or Ctrl-C (exit 130), each of which
saves the step in flight first (a second Ctrl-C stops at once). Multi-host: set
`--config.distributed=True`; the coordinator is found automatically on TPU pods
and clusters, or given with `--coordinator_address`, `--num_processes`,
`--process_id`.
"""

from additive_jax import command  # first: it quiets what later imports print
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from additive_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'checkpoints, metrics and summary go here',
                               required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in a multi-host run')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process in a multi-host run')
# the exit code of a command a shell's Ctrl-C stopped: 128 + SIGINT
_INTERRUPTED = 130


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=configs/<name>.py is required')
  if config.distributed:
    # CPU processes exchange gradients over gloo; accelerators use their own collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    summary = train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, OSError) as err:
    # Bad input (a config key, a data row, a checkpoint of another run): the message names it.
    # A config is checked before anything is loaded, so most of these come at once.
    sys.exit(f'error: {err}')
  except KeyboardInterrupt:  # Ctrl-C before training, or a second one during it
    print('interrupted: stopped at once, unsaved; rerun the same command to resume from the '
          'latest checkpoint, if any', file=sys.stderr)
    sys.exit(_INTERRUPTED)
  if summary.get('stopped_by') == 'SIGINT':  # saved; a shell reads 130 as "interrupted"
    sys.exit(_INTERRUPTED)


if __name__ == '__main__':
  command.run(main)
