"""Metrics to TensorBoard event files and a JSON-lines log in the run folder (`train.workdir`).

Only process 0 writes (every process computes the same replicated metrics).
On a local disk the JSON log is appended line by line and flushed, so a killed
run keeps every line it wrote; a resumed run drops those of the steps after its
checkpoint (it logs them again) and appends, so each step keeps one line. An
object store has no append (gcsfs turns it into an overwrite, and an object
exists only once closed): there each line is an object of its own, written
whole (`metrics/<step>_<n>.jsonl`), a resumed run deletes those of the steps
after its checkpoint, and `RunFolder.logged_lines` merges them in step order.
Paths go through `etils.epath`, so a workdir may be `gs://bucket/run`; so do TensorBoard's
event files, whose cloud writers tensorboardX would otherwise pick by itself
(one client library per store).
"""

from __future__ import annotations

import io
import json
import sys

from etils import epath
import jax
import numpy as np

if 'torch' in sys.modules:
  import tensorboardX
else:
  # tensorboardX imports torch where it is installed (1.5–3 s at every start on 2 cores) only to
  # accept torch tensors in add_scalar, and this writer passes it floats: torch is hidden from
  # that one import (the import then falls back as it does without torch), then unhidden.
  sys.modules['torch'] = None
  try:
    import tensorboardX
  finally:
    del sys.modules['torch']
from tensorboardX import record_writer  # noqa: E402

from additive_jax.train.workdir import RunFolder  # noqa: E402


class MetricsWriter:
  """`write(step, metrics)` to both; `resumed_from=k` (a run resuming from checkpoint k) first
  forgets what a killed run logged after step k, which the resumed run logs again."""

  def __init__(self, folder: RunFolder, resumed_from: int | None = None):
    self.enabled = jax.process_index() == 0
    self._closed = False
    if self.enabled:
      self._folder = folder
      folder.path.mkdir(parents=True, exist_ok=True)
      if resumed_from is not None:
        _forget_after(folder, resumed_from)
      purge = None if resumed_from is None else resumed_from + 1  # TensorBoard hides steps ≥ it
      self._tensorboard = tensorboardX.SummaryWriter(str(folder.tensorboard), purge_step=purge)
      self._log = None
      if folder.on_object_store:
        folder.metrics_segments.mkdir(parents=True, exist_ok=True)
        self._lines_at = {}  # step -> lines written at it, naming the next segment
      else:
        self._log = folder.metrics_log.open('a', encoding='utf-8')

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: float(np.asarray(value)) for name, value in metrics.items()}
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, step)
    line = json.dumps({'step': step, **values}) + '\n'
    if self._log is None:
      index = self._lines_at.get(step, 0)
      self._lines_at[step] = index + 1
      self._folder.metrics_segment(step, index).write_text(line, encoding='utf-8')
    else:
      self._log.write(line)
      self._log.flush()

  def close(self) -> None:
    if self.enabled and not self._closed:
      self._closed = True
      self._tensorboard.close()
      if self._log is not None:
        self._log.close()


class _StoreRecordWriter:
  """An event file in an object store: the records kept in memory, the object rewritten whole at
  each flush (a store has no append), as tensorboardX's own GCS writer does."""

  def __init__(self, path: str):
    self._path, self._buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _StoreWriters:
  def open(self, path: str) -> _StoreRecordWriter:
    return _StoreRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


for _prefix in ('gs', 's3', 'az'):  # the object stores epath reaches
  record_writer.register_writer_factory(_prefix, _StoreWriters())


def _forget_after(folder: RunFolder, step: int) -> None:
  """Drops the lines of steps after `step`, and a last line a kill cut short."""
  if folder.on_object_store:
    if folder.metrics_segments.is_dir():
      for segment in folder.metrics_segments.iterdir():
        if folder.segment_step(segment) > step:
          segment.unlink()
    return
  path = folder.metrics_log
  if not path.exists():
    return
  with path.open(encoding='utf-8') as f:
    kept = [line for line in f if line.endswith('\n') and json.loads(line)['step'] <= step]
  staged = path.with_name(path.name + '.tmp')
  staged.write_text(''.join(kept), encoding='utf-8')
  staged.replace(path)

