"""TFDS preparation: once, keyed by the source files' content, and atomic (a failed or killed
preparation leaves nothing that a later run takes for prepared data)."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from additive_jax.data import sources, tfds_builders
from conftest import SHARED_DATA


def write_gsm8k(directory, test_rows):
  os.makedirs(directory / 'gsm8k', exist_ok=True)
  (directory / 'gsm8k' / 'train.jsonl').write_text('{"question": "1+1?", "answer": "#### 2"}\n')
  (directory / 'gsm8k' / 'test.jsonl').write_text(''.join(row + '\n' for row in test_rows))


def version_dirs(cache):
  """The folders TFDS reads a prepared version from."""
  return sorted(glob.glob(os.path.join(cache, 'gsm8k-*', 'gsm8k', '[0-9]*')))


def incomplete_dirs(cache):
  return glob.glob(os.path.join(cache, 'gsm8k-*', 'gsm8k', 'incomplete*'))


def test_prepared_once_and_again_when_a_file_changes(tmp_path):
  cache = str(tmp_path / 'cache')
  write_gsm8k(tmp_path, ['{"question": "2+2?", "answer": "#### 4"}'])
  first = tfds_builders.data_source('gsm8k', 'test', str(tmp_path), cache)
  assert first[0] == {'prompt': b'Question: 2+2?\nAnswer:', 'response': b' #### 4', 'line': 1,
                      'column': 0}
  [version_dir] = version_dirs(cache)
  record_file = glob.glob(os.path.join(version_dir, '*test.array_record*'))[0]
  written = os.stat(record_file).st_mtime_ns
  assert len(tfds_builders.data_source('gsm8k', 'test', str(tmp_path), cache)) == 1
  assert os.stat(record_file).st_mtime_ns == written  # read back, not prepared again

  write_gsm8k(tmp_path, ['{"question": "2+2?", "answer": "#### 4"}',
                         '{"question": "3+3?", "answer": "#### 6"}'])
  changed = tfds_builders.data_source('gsm8k', 'test', str(tmp_path), cache)
  assert len(changed) == 2 and len(version_dirs(cache)) == 2


def test_bad_input_fails_the_preparation_and_leaves_nothing_behind(tmp_path):
  cache = str(tmp_path / 'cache')
  write_gsm8k(tmp_path, ['{"question": "2+2?", "answer": "#### 4"}', '{"question": "3+3?"'])
  with pytest.raises(ValueError, match=r'test.jsonl:2: malformed JSON'):
    tfds_builders.data_source('gsm8k', 'test', str(tmp_path), cache)
  assert version_dirs(cache) == []
  assert incomplete_dirs(cache) == []


def test_unknown_split_fails_before_preparing(tmp_path):
  with pytest.raises(ValueError, match="gsm8k has no split 'dev'"):
    tfds_builders.data_source('gsm8k', 'dev', SHARED_DATA, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_killed_preparation_is_not_taken_for_prepared_data(tmp_path):
  cache = str(tmp_path / 'cache')
  child = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from additive_jax.data import tfds_builders; '
       'tfds_builders.data_source("gsm8k", "test", sys.argv[1], sys.argv[2])',
       SHARED_DATA, cache], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while not incomplete_dirs(cache):
      assert child.poll() is None and time.time() < deadline, 'the preparation did not start'
      time.sleep(0.005)
    time.sleep(0.2)  # well inside the preparation of 8,792 records
    assert child.poll() is None, 'the preparation ended before it could be killed'
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert incomplete_dirs(cache) and version_dirs(cache) == []
  builder = tfds_builders.prepared_builder('gsm8k', SHARED_DATA, cache)
  assert builder.is_prepared()
  assert len(builder.as_data_source(split='train')) == 7473
  assert len(builder.as_data_source(split='test')) == 1319
