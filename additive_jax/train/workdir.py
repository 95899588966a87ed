"""A run's folder: what a run writes where, and which checkpoint a name means.

    folder = RunFolder('/tmp/run')          # any epath: a local folder or gs://bucket/run
    <workdir>/
      checkpoints/<step>/       Orbax: the trainable state, the data iterator, the config (JSON)
      metrics.jsonl             one JSON object a logged step: {'step': 20, 'loss': ..., ...}
      metrics/<step>_<n>.jsonl  on an object store instead (gs://, s3://): the same lines, one
                                object a line written whole (a store has no append); read in
                                name order they are metrics.jsonl
      tensorboard/              the same scalars as event files
      summary.json              written once, whole, when the run ends
      test_hits.json            each test row's outcome, for paired comparisons of runs
      adapter/                  the tested trainables in our adapter format
      frozen/<key>/<i>/         the adapters a method loads frozen (AdapterFusion's), copied from
                                their sources when the run started (train/frozen_sources.py)
      eval_<split>.json         what `evaluate --workdir` scored
      export/<format>_<step>/   what `export` wrote

Every writer and reader of a run goes through this module, and every command that reads a
run names its checkpoint the same way: `latest`, `best` or a step number. `best` has one
definition, the trainer's: the checkpoint ranked best by `eval_<config.eval_metric>` (with
that metric's direction: higher accuracy and exact match are better) when the run sets an
eval metric, else by the lowest `eval_loss`; the earliest of a tie. The ranking is the one
Orbax keeps with each checkpoint (`Checkpoints.best_step`), so a reader and the trainer's
final test cannot pick different steps.
"""

from __future__ import annotations

import json

from etils import epath

from additive_jax.eval.metrics import HIGHER_IS_BETTER
from additive_jax.peft.files.file_io import write_json
from additive_jax.train.checkpoint import CheckpointError, Checkpoints


def best_ranking(config) -> tuple[str, str]:
  """(the metric the best checkpoint is ranked by, 'max' or 'min') for a run's config (a
  ConfigDict or the dict a checkpoint keeps)."""
  metric = config.get('eval_metric')
  if metric:
    return f'eval_{metric}', 'max' if HIGHER_IS_BETTER.get(metric) else 'min'
  return 'eval_loss', 'min'


class RunFolder:
  """The paths of a run's files, and the readers of what the run logged."""

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.path = epath.Path(workdir)
    # gcsfs turns append into overwrite and an object exists only once closed: a store's
    # metrics are segments written whole
    self.on_object_store = '://' in self.workdir

  checkpoints = property(lambda self: self.path / 'checkpoints')
  metrics_log = property(lambda self: self.path / 'metrics.jsonl')
  metrics_segments = property(lambda self: self.path / 'metrics')
  tensorboard = property(lambda self: self.path / 'tensorboard')
  summary = property(lambda self: self.path / 'summary.json')
  test_hits = property(lambda self: self.path / 'test_hits.json')
  adapter = property(lambda self: self.path / 'adapter')

  def metrics_segment(self, step: int, index: int) -> epath.Path:
    """The object holding the `index`-th line logged at `step` (names sort in step order)."""
    return self.metrics_segments / f'{step:09d}_{index:03d}.jsonl'

  def segment_step(self, segment: epath.Path) -> int:
    return int(segment.name.split('_')[0])

  def eval_output(self, split: str) -> epath.Path:
    return self.path / f'eval_{split}.json'

  def frozen(self, key: str, index: int) -> epath.Path:
    """The copy of the `index`-th frozen adapter of method `key`."""
    return self.path / 'frozen' / key / str(index)

  def export(self, format: str, step: int) -> epath.Path:
    return self.path / 'export' / f'{format}_{step}'

  def open_checkpoints(self, config) -> Checkpoints:
    """The run's checkpoints, for the trainer: kept and ranked for `best` as `config` says."""
    metric, mode = best_ranking(config)
    return Checkpoints(str(self.checkpoints), keep=config.keep_checkpoints,
                       keep_best=config.keep_best, best_metric=metric, best_mode=mode)

  def read_checkpoints(self) -> Checkpoints:
    """The run's checkpoints, for a reader: read-only (a run may be read while it trains),
    ranked for `best` as the run's own config (saved with its latest checkpoint) ranks them."""
    if not self.checkpoints.is_dir():
      raise CheckpointError(f'{self.workdir} has no checkpoints folder: no run saved a '
                            'checkpoint there')
    checkpoints = Checkpoints(str(self.checkpoints), read_only=True)
    try:
      latest = checkpoints.latest_step()
      if latest is not None:
        checkpoints.best_metric, checkpoints.best_mode = best_ranking(
            checkpoints.restore_config(latest))
    except BaseException:
      checkpoints.close()
      raise
    return checkpoints

  def logged_lines(self) -> list[dict]:
    """Every complete line of the metrics log in step order (none if there is none): the
    local file's, or a store's segments merged."""
    if self.on_object_store:
      if not self.metrics_segments.is_dir():
        return []
      text = ''.join(segment.read_text(encoding='utf-8')
                     for segment in sorted(self.metrics_segments.iterdir()))
    elif self.metrics_log.exists():
      text = self.metrics_log.read_text(encoding='utf-8')
    else:
      return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n')]

  def logged_value(self, name: str, step: int) -> float | None:
    """The value of `name` logged at `step`, if any."""
    return next((line[name] for line in self.logged_lines()
                 if line['step'] == step and name in line), None)

  def read_summary(self) -> dict:
    return json.loads(self.summary.read_text(encoding='utf-8'))

  def write_summary(self, summary: dict) -> None:
    write_json(str(self.summary), summary)  # whole, then renamed


def chosen_step(checkpoints: Checkpoints, checkpoint: str | int | None) -> int:
  """The step `checkpoint` names among the run's checkpoints: 'latest' (or None), 'best' (the
  trainer's ranking, above) or a step number the run holds."""
  steps = checkpoints.all_steps()
  where = checkpoints.directory
  if not steps:
    raise CheckpointError(f'{where} holds no complete checkpoint')
  if checkpoint in (None, 'latest'):
    return steps[-1]
  if checkpoint == 'best':
    best = checkpoints.best_step()
    if best is None:
      raise CheckpointError(f'{where}: no checkpoint of steps {steps} was ranked by '
                            f'{checkpoints.best_metric} (config.keep_best is 0, or none was '
                            "evaluated); ask for 'latest' or a step")
    return best
  try:
    step = int(checkpoint)
  except ValueError:
    raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {checkpoint!r}"
                     ) from None
  if step not in steps:
    raise CheckpointError(f'{where} has no checkpoint of step {step} (it has steps {steps})')
  return step
