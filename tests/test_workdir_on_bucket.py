"""A workdir on a bucket (`gs://bucket/run`): training, resuming, evaluating the checkpoints and
exporting an adapter reach it only through `etils.epath`.

`gs://` paths are redirected to a temporary folder by `etils.epath.testing.mock_epath`, and
TensorStore's GCS driver spec (Orbax's array writes) to its file driver on the same folder; a
bare `open`, `os.*` or `os.path` call on a `gs:` path fails the test. What this does not cover:
TensorStore's own GCS client, and a real bucket's consistency and latency.
"""

import builtins
import contextlib
import json
import os
import shutil
from unittest import mock

from etils import epath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
import pytest

from additive_jax.export import export_run
from additive_jax.model.load import load_config
from additive_jax.peft import Bottleneck, load_adapter
from additive_jax.train.checkpoint import Checkpoints
from additive_jax.train.loop import train_and_evaluate
from additive_jax.train.workdir import RunFolder
from cli_helpers import in_process_config

BUCKET = 'gs://bucket'


def _is_bucket_path(value) -> bool:
  return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(('gs:/', 'gs:\\'))


@contextlib.contextmanager
def bucket_in(folder):
  """`gs://bucket/...` lives in `folder/bucket/...` for epath and TensorStore; any other way
  of reaching a `gs:` path raises."""
  def local(path):
    return str(folder / os.fspath(path).removeprefix('gs://')) if _is_bucket_path(path) else path

  def redirect(original, path, *args, **kwargs):
    args = [local(a) if _is_bucket_path(a) else a for a in args]  # rename/replace/copy targets
    return original(local(path), *args, **kwargs)

  def walk(original, top, **kwargs):  # the walked names must come back as bucket paths
    for root, dirs, files in original(local(top), **kwargs):
      yield root.replace(str(folder) + os.sep, 'gs://', 1), dirs, files

  def glob(original, pattern):
    return [p.replace(str(folder) + os.sep, 'gs://', 1) for p in original(local(pattern))]

  def refuse(name, original):
    def guarded(*args, **kwargs):
      if any(_is_bucket_path(a) for a in args):
        raise AssertionError(f'{name}{args} reached a bucket path outside etils.epath')
      return original(*args, **kwargs)
    return guarded

  def file_kvstore(path):
    return {'driver': 'file', 'path': local(path)}

  mocked = {name: redirect for name in ('copy', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir',
                                        'open', 'remove', 'rename', 'replace', 'rmtree', 'stat')}
  guards = [mock.patch.object(module, name, refuse(f'{module.__name__}.{name}',
                                                   getattr(module, name)))
            for module, names in ((builtins, ['open']),
                                  (os, ['stat', 'makedirs', 'mkdir', 'listdir', 'scandir',
                                        'replace', 'rename', 'remove', 'rmdir']))
            for name in names]
  with contextlib.ExitStack() as stack:
    stack.enter_context(epath_testing.mock_epath(walk=walk, glob=glob, **mocked))
    stack.enter_context(mock.patch.object(gcs_utils, 'get_kvstore_for_gcs', file_kvstore))
    # Orbax asks the bucket (google-cloud-storage) whether it has hierarchical namespaces
    stack.enter_context(mock.patch.object(gcs_utils, 'is_hierarchical_namespace_enabled',
                                          lambda path: False))
    for guard in guards:
      stack.enter_context(guard)
    yield


@pytest.fixture(scope='module')
def bucket_run(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """(local folder of the bucket, the run's summary, its losses, the resumed run's losses): a
  run trained with its workdir and its data files on the bucket; then its last checkpoint and summary are deleted,
  as a preemption before them would have left it, and it is launched again."""
  folder = tmp_path_factory.mktemp('bucket_root')
  config = in_process_config(tiny_with_tokenizer, small_sst2, [Bottleneck(dim=8)])
  config.seq_len, config.num_steps = 32, 4
  shutil.copytree(small_sst2, folder / 'bucket' / 'data')
  config.data.data_dir = f'{BUCKET}/data'
  run = folder / 'bucket' / 'run'
  with bucket_in(folder):
    summary = train_and_evaluate(config, f'{BUCKET}/run')
  with bucket_in(folder):
    losses = logged_losses(f'{BUCKET}/run')
  shutil.rmtree(run / 'checkpoints' / '4')
  os.remove(run / 'summary.json')
  with bucket_in(folder):
    resumed = train_and_evaluate(config, f'{BUCKET}/run')
  return folder, summary, losses, resumed


def logged_losses(workdir):
  return {line['step']: line['loss'] for line in RunFolder(workdir).logged_lines() if 'loss' in line}


def test_the_run_writes_everything_into_the_bucket(bucket_run):
  folder, summary, losses, _ = bucket_run
  run = folder / 'bucket' / 'run'
  assert sorted(losses) == [1, 2, 3, 4]
  assert any(name.startswith('events') for name in os.listdir(run / 'tensorboard'))
  assert sorted(os.listdir(run / 'checkpoints')) == ['2', '4']
  assert not os.path.exists('gs:'), 'a gs:// path was written relative to the working directory'


def test_the_relaunch_resumes_from_the_bucket_with_the_same_losses(bucket_run):
  folder, summary, losses, resumed = bucket_run
  with bucket_in(folder):
    assert logged_losses(f'{BUCKET}/run') == losses
  assert resumed['final_loss'] == summary['final_loss']
  assert json.loads((folder / 'bucket' / 'run' / 'summary.json').read_text())['final_loss'] == \
      summary['final_loss']


def test_checkpoints_and_an_export_on_the_bucket(bucket_run, tiny_with_tokenizer):
  folder = bucket_run[0]
  with bucket_in(folder):
    assert Checkpoints(f'{BUCKET}/run/checkpoints').latest_step() == 4
    out = export_run(f'{BUCKET}/run', 'aj', out=f'{BUCKET}/exported')
    assert out == f'{BUCKET}/exported'
    methods, _ = load_adapter(out, load_config(tiny_with_tokenizer))
  assert [m.call_string() for m in methods] == ['Bottleneck(dim=8)']
  assert sorted(os.listdir(folder / 'bucket' / 'exported')) == [
      'COMPLETE.json', 'aj_adapter.safetensors', 'aj_adapter_config.json']


def test_the_guard_refuses_a_bucket_path_outside_epath(tmp_path):
  with bucket_in(tmp_path):
    epath.Path(BUCKET).mkdir()
    epath.Path(f'{BUCKET}/ok').write_text('through epath')
    for reach in (lambda: open(f'{BUCKET}/ok', encoding='utf-8'),
                  lambda: os.makedirs(f'{BUCKET}/dir'), lambda: os.path.exists(f'{BUCKET}/ok'),
                  lambda: os.replace(f'{BUCKET}/ok', f'{BUCKET}/moved')):
      with pytest.raises(AssertionError, match='outside etils.epath'):
        reach()
  assert (tmp_path / 'bucket' / 'ok').read_text() == 'through epath'
