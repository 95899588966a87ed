"""Preemption through the CLI: a run killed (SIGKILL) in the middle of a save resumes from its
last complete checkpoint and logs the losses, bit for bit, of a run that never stopped; what a
checkpoint of a real run holds on disk; a workdir of another method set refused on resume.

The runs train the tiny Llama with SmolLM2's tokenizer for 6 steps, checkpointing and
evaluating every 2 (`configs/sst2.py:runlocal`), on the first 200 rows of SST-2."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest

from additive_jax.model.load import load_config
from additive_jax.peft import IA3, Bottleneck
from additive_jax.train.checkpoint import CheckpointError, Checkpoints
from additive_jax.train.loop import train_and_evaluate
from cli_helpers import ROOT, in_process_config, run_main
from conftest import free_port, xla_flags
from sharded_helpers import assert_same_trainables, flat

STEPS = 6

# The CLI, killed as a preemption would kill it, inside the save of one step: its background
# thread has written the arrays into the temporary folder and SIGKILLs the process as it starts
# to finalize them, before the folder is renamed. Training waits on that save, so that the log
# ends at the step saved.
KILLED_DURING_SAVE = """
import os, signal
import orbax.checkpoint as ocp
from additive_jax import main
from additive_jax.train.checkpoint import Checkpoints

kill_step = int(os.environ['KILL_DURING_SAVE_OF_STEP'])
save, finalize = Checkpoints.save, ocp.StandardCheckpointHandler.finalize

def save_and_wait(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  if step == kill_step:
    self.wait()

def finalize_or_die(self, directory):
  if f'{kill_step}.orbax-checkpoint-tmp' in str(directory).split(os.sep):
    os.kill(os.getpid(), signal.SIGKILL)
  finalize(self, directory)

Checkpoints.save = save_and_wait
ocp.StandardCheckpointHandler.finalize = finalize_or_die
main.command.run(main.main)
"""


# The CLI sent SIGTERM (a preemption's notice), or the signals SIGNALS names in order (SIGINT:
# Ctrl-C), while step N runs: the step finishes, a checkpoint of it is saved and the run exits
# 0 (130 after a Ctrl-C); a second Ctrl-C stops it at once.
SIGNALLED_DURING_STEP = """
import os, signal
from additive_jax import main
from additive_jax.train import loop

# the loop places each step's batch (global_batch) just before it runs the step
at, global_batch, calls = int(os.environ['SIGNALLED_DURING_STEP']), loop.global_batch, []
signals = os.environ.get('SIGNALS', 'SIGTERM').split(',')

def signalled_at(*args):
  calls.append(1)
  if len(calls) == at:
    for name in signals:
      os.kill(os.getpid(), getattr(signal, name))
  return global_batch(*args)

loop.global_batch = signalled_at
main.command.run(main.main)
"""


@pytest.fixture(scope='module')
def overrides(tiny_with_tokenizer, small_sst2):
  return (f'--config.model={tiny_with_tokenizer}', f'--config.data.data_dir={small_sst2}',
          '--config.test_metric=', f'--config.num_steps={STEPS}')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, overrides):
  """The workdir of a run that never stopped."""
  workdir = tmp_path_factory.mktemp('reference')
  result = run_main(workdir, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


TIMINGS = ('tokens_per_s', 'model_tflops_per_s', 'mfu')  # measured, not computed


def metric_lines(workdir, timing=False):
  """metrics.jsonl, without the throughput (a wall-clock measure) unless `timing`."""
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return lines if timing else [{k: v for k, v in line.items() if k not in TIMINGS}
                               for line in lines]


def run_script(script, workdir, overrides, **env):
  """The CLI run by `script` (one of the above) on one device, with `env` added."""
  args = [sys.executable, '-c', script, '--config=configs/sst2.py:pfeiffer,runlocal',
          f'--workdir={workdir}', '--config.peft.bottleneck.dim=8', *overrides]
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1), **env}
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_killed_during_a_save_resumes_with_bit_identical_losses(tmp_path, reference_run,
                                                                      overrides):
  killed = run_script(KILLED_DURING_SAVE, tmp_path, overrides, KILL_DURING_SAVE_OF_STEP='4')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # Step 4's save was cut short: its temporary folder is left, step 2 is the last complete one,
  # and the log holds steps 3 and 4, which the resumed run replays.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4.orbax-checkpoint-tmp']
  assert [line['step'] for line in metric_lines(tmp_path) if 'loss' in line] == [1, 2, 3, 4]

  resumed = run_main(tmp_path, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 2' in resumed.stdout
  assert '4.orbax-checkpoint-tmp' not in os.listdir(tmp_path / 'checkpoints')
  reference = metric_lines(reference_run)
  assert len({line['loss'] for line in reference if 'loss' in line}) == STEPS  # training moves
  # Every train and eval line, each step once, equal to the float: losses, gradient norms,
  # learning rates, eval losses.
  assert metric_lines(tmp_path) == reference


def test_sigterm_saves_the_step_exits_0_and_the_run_resumes_bit_identically(tmp_path,
                                                                             reference_run,
                                                                             overrides):
  stopped = run_script(SIGNALLED_DURING_STEP, tmp_path, overrides, SIGNALLED_DURING_STEP='3')
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert 'preempted: saved step 3' in stopped.stdout
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert not (tmp_path / 'summary.json').exists()  # the run is not finished
  resumed = run_main(tmp_path, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 3' in resumed.stdout
  assert metric_lines(tmp_path) == metric_lines(reference_run)


def test_ctrl_c_saves_the_step_and_exits_130_and_a_second_ctrl_c_stops_at_once(tmp_path,
                                                                              overrides):
  """As SIGTERM, but exit 130; then, resumed, Ctrl-C twice in step 4: nothing more saved."""
  stopped = run_script(SIGNALLED_DURING_STEP, tmp_path, overrides, SIGNALLED_DURING_STEP='3',
                       SIGNALS='SIGINT')
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  assert 'interrupted (Ctrl-C): saved step 3' in stopped.stdout
  assert ('interrupted (Ctrl-C): the step in flight finishes and is saved; Ctrl-C again stops '
          'at once, unsaved') in stopped.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert not (tmp_path / 'summary.json').exists()  # the run is not finished

  twice = run_script(SIGNALLED_DURING_STEP, tmp_path, overrides, SIGNALLED_DURING_STEP='1',
                     SIGNALS='SIGINT,SIGINT')
  assert twice.returncode == 130, twice.stderr[-3000:]
  assert 'resumed from step 3' in twice.stdout and 'saved step' not in twice.stdout
  assert twice.stderr.rstrip().endswith(
      'interrupted: stopped at once, unsaved; rerun the same command to resume from the latest '
      'checkpoint, if any')
  assert 'Traceback' not in twice.stderr, twice.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert max(line['step'] for line in metric_lines(tmp_path)) == 3  # step 4 never ran


def test_a_checkpoint_holds_the_trainable_state_and_no_frozen_weight(reference_run,
                                                                     tiny_with_tokenizer):
  step = STEPS
  checkpoints = Checkpoints(str(reference_run / 'checkpoints'), read_only=True)
  saved = {leaf.name: leaf.shape for leaf in
           jax.tree.leaves(checkpoints.manager.item_metadata(step).state.tree)}
  trainable = {name: shape for name, shape in saved.items() if name.startswith('peft.')}
  # Every saved array: the step, each trainable leaf, Adam's two moments of it, step counters.
  assert sorted(saved.values()) == sorted([()] * (len(saved) - 3 * len(trainable)) +
                                          list(trainable.values()) * 3)
  assert all(name.startswith(('step', 'peft.', 'opt_state.')) for name in saved)

  trainable_bytes = 4 * sum(math.prod(shape) for shape in trainable.values())
  files = [os.path.join(folder, name) for folder, _, names in
           os.walk(checkpoints.step_directory(step)) for name in names]
  total = sum(os.path.getsize(path) for path in files)
  arrays = sum(os.path.getsize(path) for path in files
               if os.path.basename(os.path.dirname(path)) == 'd')
  base_bytes = 4 * load_config(tiny_with_tokenizer).num_base_params
  # The arrays (zstd-compressed chunks in OCDBT files: trained fp32 values shrink by ~7%) hold
  # three copies of the trainables, plus the B-tree's few hundred bytes per leaf; the rest is
  # Orbax's JSON metadata, ~1 KiB per leaf.
  assert 0.75 * 3 * trainable_bytes <= arrays <= 3 * trainable_bytes + 512 * len(saved)
  assert total <= 3 * trainable_bytes + 2048 * len(saved)
  assert 100 * total < base_bytes


def test_resuming_a_workdir_of_another_config_names_what_differs(reference_run,
                                                                  tiny_with_tokenizer, small_sst2):
  before = sorted(os.listdir(reference_run / 'checkpoints'))
  config = in_process_config(tiny_with_tokenizer, small_sst2, [IA3()])
  with pytest.raises(CheckpointError, match='holds a run with another config') as error:
    train_and_evaluate(config, str(reference_run))
  assert "peft: ['Bottleneck(dim=8)'] -> ['IA3()']" in str(error.value)
  # What is computed may not change (the seed); how the run is watched may (log_every).
  config = in_process_config(tiny_with_tokenizer, small_sst2, [Bottleneck(dim=8)])
  config.seed, config.log_every = 7, 3
  with pytest.raises(CheckpointError, match='holds a run with another config') as error:
    train_and_evaluate(config, str(reference_run))
  assert 'seed: 0 -> 7' in str(error.value) and 'log_every' not in str(error.value)
  assert sorted(os.listdir(reference_run / 'checkpoints')) == before


def test_one_of_two_processes_signalled_both_stop_at_one_step_and_save_it(tmp_path,
                                                                          tiny_with_tokenizer,
                                                                          small_sst2):
  """JAX's preemption service hears the signal on process 1 and names one step for both."""
  port = free_port()
  common = [f'--workdir={tmp_path}', '--config=configs/sst2.py:pfeiffer,runlocal',
            '--config.peft.bottleneck.dim=8', f'--config.model={tiny_with_tokenizer}',
            f'--config.data.data_dir={small_sst2}', '--config.test_metric=',
            '--config.num_steps=400', '--config.checkpoint_every=1000', '--config.eval_every=0',
            '--config.distributed=True', f'--coordinator_address=localhost:{port}',
            '--num_processes=2']
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1),
         'SIGNALLED_DURING_STEP': '3'}
  logs = [open(tmp_path / f'process{i}.log', 'w+', encoding='utf-8') for i in range(2)]
  workers = [subprocess.Popen(
      [sys.executable, *(['-m', 'additive_jax.main'] if i == 0 else ['-c', SIGNALLED_DURING_STEP]),
       *common, f'--process_id={i}'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
      for i, log in enumerate(logs)]
  said = []
  for worker, log in zip(workers, logs):
    worker.wait(timeout=300)
    log.seek(0)
    text = log.read()
    assert worker.returncode == 0, text[-3000:]
    said.append([line for line in text.splitlines() if line.startswith('preempted: saved step')])
  assert len(said[0]) == 1 and said[1] == []  # process 0 alone speaks
  step = int(said[0][0].split()[3])
  assert 3 <= step < 400  # a step both reached, before the end of the run
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == [str(step)]  # saved by both, together


def test_a_run_resumes_with_another_process_count_with_the_same_batches(tmp_path,
                                                                       tiny_with_tokenizer,
                                                                       small_sst2):
  """Elastic: the global batch of a step is the same for any process count (one global stream,
  each process its rows), so a run of two processes resumed by one from step 8, and a run of
  one resumed by two, log the losses of one process that never stopped and end with its
  trainable values. (The first is also two processes training as one: steps 1–8.)"""
  trainer = ['--config=configs/sst2.py:pfeiffer,runlocal', '--config.peft.bottleneck.dim=8',
             f'--config.model={tiny_with_tokenizer}', f'--config.data.data_dir={small_sst2}',
             '--config.test_metric=', '--config.num_steps=12', '--config.checkpoint_every=4',
             '--config.eval_every=0']
  two_devices = {**os.environ, 'XLA_FLAGS': xla_flags(2)}
  one_device = {**os.environ, 'XLA_FLAGS': xla_flags(1)}

  def one_process(workdir):
    result = subprocess.run([sys.executable, '-m', 'additive_jax.main', *trainer,
                             f'--workdir={workdir}'], cwd=ROOT, env=two_devices,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  def two_processes(workdir):
    port = free_port()
    workers = [subprocess.Popen(
        [sys.executable, '-m', 'additive_jax.main', *trainer, f'--workdir={workdir}',
         '--config.distributed=True', f'--coordinator_address=localhost:{port}',
         '--num_processes=2', f'--process_id={i}'],
        cwd=ROOT, env=one_device, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, out in zip(workers, outputs):
      assert worker.returncode == 0, out[-3000:]
    return outputs[0]

  def stopped_after_8(workdir):  # as if the run had stopped after step 8: the latest checkpoint
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '8']
    shutil.rmtree(workdir / 'checkpoints' / '12')

  def final_trainables(workdir):  # read onto this process's first device, whoever wrote them
    checkpoints = Checkpoints(str(workdir / 'checkpoints'), read_only=True)
    on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = checkpoints.manager.item_metadata(12).state.tree
    state = checkpoints.restore(12, jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_one_device), saved))
    return flat(state['peft'])

  reference = tmp_path / 'reference'
  one_process(reference)
  shrunk, grown = tmp_path / 'two_then_one', tmp_path / 'one_then_two'
  shutil.copytree(reference, grown)
  two_processes(shrunk)
  stopped_after_8(shrunk)
  assert 'resumed from step 8' in one_process(shrunk)
  stopped_after_8(grown)
  assert 'resumed from step 8' in two_processes(grown)
  expected = [line['loss'] for line in metric_lines(reference) if 'loss' in line]
  assert len(expected) == 12
  for run in (shrunk, grown):
    losses = [line['loss'] for line in metric_lines(run) if 'loss' in line]
    assert len(losses) == 12
    # across processes the gradients are summed by gloo, in one process by XLA: the same
    # batches, the sums in another order
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) < 1e-5, run.name
    assert_same_trainables(final_trainables(run), final_trainables(reference))
