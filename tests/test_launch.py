"""The launcher (additive_jax/launch.py): the commands of a dry run, word for word; a tpu run
against a stand-in gcloud; a failing process stopping the others; `local` training as one
process does; the tpu backend's worker command training here as two processes."""

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from additive_jax import launch, launch_backends
from cli_helpers import ROOT
from conftest import free_port, xla_flags

# The command line as a user's shell has it: none of the test process's 8 devices, and the
# checkout's root on the path as `python -m` puts it there.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PYTHONSAFEPATH')}
ONE_DEVICE = 'XLA_FLAGS=' + xla_flags(1)


def run_launch(*args, env=CLEAN_ENV, timeout=30):
  return subprocess.run([sys.executable, '-m', 'additive_jax.launch', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def dry_run(*args):
  result = run_launch(*args)
  assert result.returncode == 0, result.stderr
  # the interpreter is not the launcher's: a placeholder
  return result.stdout.replace(sys.executable, 'PYTHON')


# The worker command's lock clearing and stop command, quoted as shlex.join quotes them inside
# the --command=... argument.
Q = "'\"'\"'"
KILL = (f'pkill -KILL -u "$(id -u)" -f {Q}^[^ ]*python[^ ]* -m additive_jax[.]main( |$){Q}; '
        f'for _ in $(seq 50); do pgrep -u "$(id -u)" -f {Q}^[^ ]*python[^ ]* -m '
        f'additive_jax[.]main( |$){Q} >/dev/null || break; sleep 0.2; done')
INSTALL = (f'python3 -m venv .venv && .venv/bin/python -m pip install -q {Q}.[tpu]{Q} -f '
           'https://storage.googleapis.com/jax-releases/libtpu_releases.html')
INSTALL_GCSFS = INSTALL.replace(f'{Q}.[tpu]{Q}', f'{Q}.[tpu]{Q} gcsfs')


def test_tpu_dry_run():
  out = dry_run('tpu', '--tpu=pod', '--zone=us-central2-b', '--num_workers=2', '--dry-run', '--',
                '--config=configs/sst2.py:lora', '--workdir=gs://bucket/run')
  worker = ('mkdir -p ~/additive_jax && tar -xzf ~/additive_jax_checkout.tar.gz -C ~/additive_jax '
            f'&& cd ~/additive_jax && {INSTALL} && {{ {KILL}; }} && sudo rm -f '
            '/tmp/libtpu_lockfile && PYTHONUNBUFFERED=1 exec .venv/bin/python -m '
            'additive_jax.main --config=configs/sst2.py:lora --workdir=gs://bucket/run '
            '--config.distributed=True')
  assert out == (
      'git archive --format=tar.gz --output=logs/pod/checkout.tar.gz HEAD\n'
      'gcloud compute tpus tpu-vm scp logs/pod/checkout.tar.gz pod:additive_jax_checkout.tar.gz '
      '--worker=all --zone=us-central2-b\n'
      f"gcloud compute tpus tpu-vm ssh pod --worker=0 '--command={worker}' --zone=us-central2-b\n"
      f"gcloud compute tpus tpu-vm ssh pod --worker=1 '--command={worker}' --zone=us-central2-b\n"
      f"# when a worker fails: gcloud compute tpus tpu-vm ssh pod --worker=all '--command={KILL}' "
      '--zone=us-central2-b\n')


def test_tpu_dry_run_with_a_project_a_ref_a_package_and_quoting():
  out = dry_run('tpu', '--tpu=pod', '--zone=europe-west4-a', '--project=my-project', '--ref=v0.1',
                '--repo_dir=~/runs/a b', '--num_workers=1', '--logs=/tmp/launch logs',
                '--pip=gcsfs', '--dry-run', '--', '--config=configs/sst2.py:ia3', '--workdir=gs://bucket/run 2')
  where = f'~/{Q}runs/a b{Q}'
  worker = (f'mkdir -p {where} && tar -xzf ~/additive_jax_checkout.tar.gz -C {where} && cd '
            f'{where} && {INSTALL_GCSFS} && {{ {KILL}; }} && sudo rm -f /tmp/libtpu_lockfile && '
            'PYTHONUNBUFFERED=1 exec .venv/bin/python -m additive_jax.main '
            f'--config=configs/sst2.py:ia3 {Q}--workdir=gs://bucket/run 2{Q} '
            '--config.distributed=True')
  flags = '--zone=europe-west4-a --project=my-project'
  assert out == (
      "git archive --format=tar.gz '--output=/tmp/launch logs/pod/checkout.tar.gz' v0.1\n"
      "gcloud compute tpus tpu-vm scp '/tmp/launch logs/pod/checkout.tar.gz' "
      f'pod:additive_jax_checkout.tar.gz --worker=all {flags}\n'
      f"gcloud compute tpus tpu-vm ssh pod --worker=0 '--command={worker}' {flags}\n"
      f"# when a worker fails: gcloud compute tpus tpu-vm ssh pod --worker=all '--command={KILL}' "
      f'{flags}\n')


def test_local_dry_run():
  out = dry_run('local', '--processes=2', '--port=12345', '--dry-run', '--',
                '--config=configs/sst2.py:lora,runlocal', '--workdir=/tmp/run')
  assert out == ''.join(
      'env XLA_FLAGS=--xla_force_host_platform_device_count=1 PYTHONUNBUFFERED=1 PYTHON -m '
      'additive_jax.main '
      '--config=configs/sst2.py:lora,runlocal --workdir=/tmp/run --config.distributed=True '
      f'--coordinator_address=localhost:12345 --num_processes=2 --process_id={i}\n'
      for i in range(2))


def test_local_keeps_the_callers_xla_flags():
  result = run_launch('local', '--processes=1', '--port=1', '--dry-run', '--', '--workdir=w',
                      env={**CLEAN_ENV, 'XLA_FLAGS': '--xla_dump_to=/tmp/x'})
  assert result.stdout.startswith('env PYTHONUNBUFFERED=1 '), result.stdout


@pytest.mark.parametrize('args, message', [
    (['gpu', '--', '--workdir=w'], 'give one backend, tpu or local (not gpu)'),
    (['local', '--processes=2'], "give the trainer's args after --"),
    (['local', '--tpu=pod', '--processes=2', '--', '--workdir=w'],
     '--tpu is a flag of the tpu backend, not of local'),
    (['tpu', '--tpu=pod', '--', '--workdir=w'], 'tpu needs --tpu=NAME and --zone=ZONE'),
    (['tpu', '--tpu=pod', '--zone=z', '--dry-run', '--', '--workdir=w'],
     '--dry-run needs --num_workers'),
])
def test_usage_errors_are_one_line(args, message):
  result = run_launch(*args)
  assert result.returncode == 1 and result.stderr.startswith(f'error: {message}'), result.stderr
  assert result.stderr.count('\n') == 1


def test_the_accelerator_extras_are_jax_s_own_in_the_project_s_jax_range():
  """`pip install '.[tpu]'` (the launcher's) and `'.[cuda]'` get a jax the project was tested
  with, not the newest."""
  tree = ast.parse(open(os.path.join(ROOT, 'setup.py'), encoding='utf-8').read())
  keywords = {k.arg: k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
              for k in node.keywords}
  requires = ast.literal_eval(keywords['install_requires'])
  extras = ast.literal_eval(keywords['extras_require'])
  jax = next(r for r in requires if re.match(r'jax[<>=]', r))
  assert '<' in jax  # an upper bound: an install gets a tested jax
  assert extras['tpu'] == ['jax[tpu]' + jax[len('jax'):]]
  assert extras['cuda'] == ['jax[cuda12]' + jax[len('jax'):]]
  assert launch_backends.TPU_INSTALL == '.[tpu]'


def test_the_kill_pattern_matches_trainers_only():
  pattern = re.compile(launch_backends.TRAINER_PATTERN)
  assert pattern.search('.venv/bin/python -m additive_jax.main --config=configs/sst2.py')
  assert pattern.search('/usr/bin/python3.11 -m additive_jax.main')
  # the shell running a worker command (or the kill itself), and other modules
  assert not pattern.search("bash -c cd ~/a && exec .venv/bin/python -m additive_jax.main --x")
  assert not pattern.search('python -m additive_jax.main_other')
  assert not pattern.search('python -m additive_jax.export --workdir=w')


def test_worker_counts_and_argument_split():
  assert launch_backends.count_workers('10.0.0.2;10.0.0.3;10.0.0.4\n') == 3
  assert launch_backends.count_workers('\n') == 0
  assert launch.split_trainer_args(['l', 'tpu', '--', '--a', '--', 'b']) == (['l', 'tpu'],
                                                                          ['--a', '--', 'b'])


def test_prefixer_marks_every_line_across_chunks():
  prefix = launch.LinePrefixer('[p 0] ')
  assert prefix(b'one\ntw') + prefix(b'o\n\rbar 1\rbar 2\r\n') == (
      b'[p 0] one\n[p 0] two\n[p 0] \r[p 0] bar 1\r[p 0] bar 2\r\n')


def test_the_worker_command_unpacks_the_checkout_and_runs_from_it(tmp_path):
  """Its shell quoting, `~/` included, and the flags it appends, with a stand-in trainer."""
  tarball = tmp_path / 'checkout.tar.gz'
  stand_in = tmp_path / 'stand_in' / 'additive_jax'
  os.makedirs(stand_in)
  (stand_in / '__init__.py').write_text('')
  (stand_in / 'main.py').write_text('import json, os, sys; print(json.dumps([os.getcwd(), '
                                    'sys.argv[1:], os.environ["PYTHONUNBUFFERED"]]))')
  with tarfile.open(tarball, 'w:gz') as tar:
    tar.add(stand_in, arcname='additive_jax')
  command = launch_backends.worker_command(
      ['--workdir=a b', "--config.x='y'"], repo_dir='~/my checkout', python=sys.executable,
      tarball=str(tarball), install=False, clear_lock=False, process_flags=['--process_id=1'])
  result = subprocess.run(['bash', '-c', command], env={**CLEAN_ENV, 'HOME': str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == [
      str(tmp_path / 'my checkout'),
      ['--workdir=a b', "--config.x='y'", '--config.distributed=True', '--process_id=1'], '1']


def test_a_failing_process_stops_the_others(tmp_path, capsys):
  pid_file, stopped = tmp_path / 'sleeper.pid', tmp_path / 'stopped'
  sleeper = (f'import os, time; open({str(pid_file)!r}, "w").write(str(os.getpid())); '
             'print("sleeping", flush=True); time.sleep(60)')
  failing = 'import time; time.sleep(1); print("the reason"); raise SystemExit(3)'
  logs = [str(tmp_path / 'logs' / f'worker{i}.log') for i in range(2)]
  start = time.monotonic()
  code = launch.supervise([[sys.executable, '-c', sleeper], [sys.executable, '-c', failing]],
                          logs, stop=[sys.executable, '-c', f'open({str(stopped)!r}, "w")'])
  assert code == 3 and time.monotonic() - start < 8
  out, err = capsys.readouterr()
  assert out == '[worker 0] sleeping\n'
  assert err.endswith(f'the reason\nerror: worker 1 failed (exit code 3); its log: {logs[1]}\n')
  with pytest.raises(ProcessLookupError):  # the sleeper is gone (and reaped)
    os.kill(int(pid_file.read_text()), 0)
  assert stopped.exists()  # the stop command ran (on a pod: the kill on every worker)
  assert open(logs[0]).read() == 'sleeping\n' and open(logs[1]).read() == 'the reason\n'


FAKE_GCLOUD = """#!{python}
import json, sys, time
with open({calls!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
verb, worker = sys.argv[4], next((a for a in sys.argv if a.startswith('--worker=')), None)
if verb == 'describe':
  print('10.0.0.2;10.0.0.3')
elif verb == 'ssh' and worker == '--worker=0':
  print('training', flush=True)
  time.sleep(60)
elif verb == 'ssh' and worker == '--worker=1':
  print('worker 1 broke')
  sys.exit(7)
"""


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, '.git')), reason='not a git checkout')
def test_the_tpu_backend_ships_starts_and_stops_every_worker(tmp_path):
  """A real run against a stand-in gcloud: the worker count from describe, the tarball copied,
  one ssh per worker, and when worker 1 fails, worker 0's stopped and the kill on every one."""
  calls = tmp_path / 'calls.jsonl'
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'gcloud').write_text(FAKE_GCLOUD.format(python=sys.executable,
                                                              calls=str(calls)))
  os.chmod(tmp_path / 'bin' / 'gcloud', 0o755)
  logs = tmp_path / 'logs'
  start = time.monotonic()
  result = run_launch('tpu', '--tpu=pod', '--zone=z', f'--logs={logs}', '--',
                      '--config=configs/sst2.py', '--workdir=gs://b/r',
                      env={**CLEAN_ENV, 'PATH': f'{tmp_path / "bin"}:{os.environ["PATH"]}'})
  assert result.returncode == 7 and time.monotonic() - start < 20, result.stderr
  assert result.stderr.endswith('worker 1 broke\nerror: worker 1 failed (exit code 7); its log: '
                                f'{logs}/pod/worker1.log\n'), result.stderr
  assert result.stdout == '[worker 0] training\n'
  verbs = [(call[3], next((a for a in call if a.startswith('--worker=')), None))
           for call in map(json.loads, calls.read_text().splitlines())]
  assert verbs[:2] == [('describe', None), ('scp', '--worker=all')]
  assert sorted(verbs[2:4]) == [('ssh', '--worker=0'), ('ssh', '--worker=1')]
  assert verbs[4:] == [('ssh', '--worker=all')]
  with tarfile.open(logs / 'pod' / 'checkout.tar.gz') as tar:
    assert {'setup.py', 'additive_jax/main.py'} <= set(tar.getnames())  # HEAD's files


# ---- real training runs: the tiny Llama on 200 rows of SST-2, 4 steps of 2 rows -------------

def trainer_args(model, data_dir, workdir):
  return ['--config=configs/sst2.py:pfeiffer,runlocal', '--config.peft.bottleneck.dim=8',
          f'--config.model={model}', f'--config.data.data_dir={data_dir}', '--config.test_metric=',
          f'--workdir={workdir}']


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [row['loss'] for row in rows if 'loss' in row]


class Reference:
  """A single-process run of two devices, started at once and awaited when its losses are
  needed: it runs while a test's own run does."""

  def __init__(self, args, log):
    self.log = log
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'additive_jax.main', *args], cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, env={**CLEAN_ENV,
                                       'XLA_FLAGS': xla_flags(2)})
    self.workdir = args[-1].split('=', 1)[1]

  def losses(self):
    self.process.wait(timeout=300)
    self.log.seek(0)
    assert self.process.returncode == 0, self.log.read()[-3000:]
    return losses(self.workdir)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  directory = tmp_path_factory.mktemp('reference')
  with open(directory / 'run.log', 'w+', encoding='utf-8') as log:
    run = Reference(trainer_args(tiny_with_tokenizer, small_sst2, directory / 'run'), log)
    yield run
    run.process.kill()
    run.process.wait()


def test_local_backend_trains_as_one_process_does(tmp_path, tiny_with_tokenizer, small_sst2,
                                                  reference):
  workdir = tmp_path / 'run'
  result = run_launch('local', '--processes=2', f'--logs={tmp_path / "logs"}', '--',
                      *trainer_args(tiny_with_tokenizer, small_sst2, workdir), timeout=300,
                      env={**CLEAN_ENV, 'XLA_FLAGS': xla_flags(1)})  # the caller's, kept
  assert result.returncode == 0, result.stderr[-3000:]
  assert '[process 0] ' in result.stdout  # process 0 streamed, every line marked
  logs = [tmp_path / 'logs' / 'local' / f'process{i}.log' for i in range(2)]
  assert 'trainable' in logs[0].read_text()  # process 0 prints the run's report
  assert logs[1].exists()  # every process has its own log (the others print nothing but warnings)
  # 2 processes × 1 device see the same global batches as 1 process × 2 devices
  assert len(losses(workdir)) == 4
  np.testing.assert_allclose(losses(workdir), reference.losses(), rtol=1e-5)


def test_the_tpu_worker_command_trains_here(tmp_path, tiny_with_tokenizer, small_sst2,
                                            reference):
  """The string each TPU worker runs, from the trainer on (no install, no sudo), as two local
  processes: given the coordinator flags that jax finds itself on a pod."""
  workdir, port = tmp_path / 'run', free_port()
  args = trainer_args(tiny_with_tokenizer, small_sst2, workdir)
  commands = [['env', ONE_DEVICE, 'bash', '-c', launch_backends.worker_command(
      args, repo_dir=ROOT, python=sys.executable, tarball=None, install=False, clear_lock=False,
      process_flags=[f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}'])] for i in range(2)]
  logs = [str(tmp_path / f'worker{i}.log') for i in range(2)]
  code = launch.supervise(commands, logs)
  assert code == 0, ''.join(open(log).read()[-2000:] for log in logs)
  np.testing.assert_allclose(losses(workdir), reference.losses(), rtol=1e-5)
