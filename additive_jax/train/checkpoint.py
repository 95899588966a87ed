"""Orbax checkpoints of a run: the trainable state, the data iterator, the config.

A checkpoint holds `TrainState` (the step, `variables['peft']` and its optimizer
state), the grain iterator's position and the run's config as JSON; never the
frozen base, which is re-read from its own checkpoint. Orbax writes each save
into a `<step>.orbax-checkpoint-tmp` folder and renames it when complete, so a
save killed half-way leaves the previous checkpoint as the latest usable one;
the next `Checkpoints` over the folder deletes the leftover. Saves are
asynchronous: training continues while the arrays are written.

Retention keeps the latest `keep` checkpoints *and* the `keep_best` best by the
configured eval metric (Orbax preservation policies combined), so resuming never
loses the newest step and the best one survives later, worse evaluations.

Restoring takes the abstract state of the current run (shapes, dtypes and
shardings) and places every array on the current mesh, whatever mesh saved it.
Before reading an array it compares the saved leaves with the ones the run
needs, so a checkpoint of another base or method set fails with each differing
leaf named; a corrupt or truncated file fails with the file named.
"""

from __future__ import annotations

import json
import os
import re

from etils import epath
from flax import traverse_util
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from additive_jax.peft.files.file_io import join_problems, shape_problems
from additive_jax.train.config_checks import methods_of


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that does not fit the run restoring it."""


def _iterator_position(iterator) -> dict:
  """The iterator's position when `save` was called, copied: an async save writes it later,
  after the live iterator has moved on. The same on every process (data/pipeline.py), so
  the primary process alone writes it and any process count reads it back."""
  return json.loads(json.dumps(iterator.get_state()))


class Checkpoints:
  """`save` / `restore` of a run's state in `directory` (a folder of the workdir).

  `read_only=True` opens the checkpoints of a run without touching them (export): no
  retention, and the temporary folder of a save still in progress is left alone."""

  def __init__(self, directory: str, keep: int = 2, keep_best: int = 1,
               best_metric: str = 'eval_loss', best_mode: str = 'min', read_only: bool = False):
    if best_mode not in ('min', 'max'):
      raise ValueError(f"checkpoint best_mode must be 'min' or 'max', got {best_mode!r}")
    # a cloud path as it is; a local one made absolute, as Orbax wants
    local = '://' not in str(directory)
    self.directory = epath.Path(os.path.abspath(directory) if local else directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      policies = [preservation_policy.LatestN(keep)]
      if keep_best:
        policies.append(preservation_policy.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min',
            n=keep_best, keep_checkpoints_without_metrics=False))
      # best_fn as well: without it Orbax keeps a step's metrics in memory only, and a resumed
      # run would have forgotten which checkpoint was best
      ranking = {'best_fn': lambda metrics: metrics[best_metric], 'best_mode': best_mode} \
          if keep_best else {}
      options = ocp.CheckpointManagerOptions(
          preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
          enable_async_checkpointing=True, cleanup_tmp_directories=True, **ranking)
    # Handlers named up front, so that a fresh manager can read a checkpoint's metadata.
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept checkpoint ranked best by `best_metric`, the earliest of a tie (None where none
    was saved with metrics). Orbax's own `best_step` ranks by `best_fn`, which the preservation
    policies above replace."""
    ranked = {step: metrics[self.best_metric] for step in self.manager.all_steps()
              if (metrics := self.manager.metrics(step)) and self.best_metric in metrics}
    if not ranked:
      return None
    pick = max if self.best_mode == 'max' else min
    return pick(sorted(ranked), key=ranked.__getitem__)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_directory(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state, data_iterator, config: dict, metrics: dict | None = None) -> None:
    """Starts an async save; `metrics` (with `best_metric`) ranks it for keep-best."""
    if metrics is not None and self.best_metric not in metrics:
      metrics = None  # not an evaluation step: kept by recency alone
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_iterator_position(data_iterator)),
        config=ocp.args.JsonSave(config)), metrics=metrics)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state saved at `step`, on the shardings of `abstract_state`; with `data_iterator`,
    moves the iterator to the saved position."""
    self._check_fits(step, abstract_state)
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args['data'] = ocp.args.JsonRestore()
    restored = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(**args)))
    if data_iterator is not None:
      data_iterator.set_state(restored.data)
    return restored.state

  def restore_config(self, step: int) -> dict:
    self._require(step)
    return self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))).config

  def wait(self) -> None:
    """Blocks until the last async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def _require(self, step: int) -> None:
    if step not in self.manager.all_steps():
      raise CheckpointError(f'{self.directory} has no checkpoint of step {step} (it has steps '
                            f'{self.all_steps()})')

  def _check_fits(self, step: int, abstract_state) -> None:
    """Compares the saved leaves' shapes with the run's and names every difference (Orbax
    stops at the first, deep in a trace)."""
    self._require(step)
    saved = self._read(step, lambda: self.manager.item_metadata(step).state)
    if saved is None:  # what Orbax returns when the item's metadata file is gone
      raise CheckpointError(f'{self.step_directory(step)}/state has no metadata (_METADATA)')
    saved_leaves = {leaf.name: leaf for leaf in jax.tree.leaves(saved.tree)}
    needed = {jax.tree_util.keystr(path, simple=True, separator='.'): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
    trainable = lambda leaves: {name: x for name, x in leaves.items() if name.startswith('peft.')}
    # The trainables' differences say what differs; the optimizer state's follow from them.
    problems = (shape_problems(trainable(needed), trainable(saved_leaves)) or
                shape_problems(needed, saved_leaves))
    if problems:
      saved_config = self.restore_config(step)
      written_by = {'model': saved_config.get('model'),
                    'peft': [m.call_string() for m in methods_of(saved_config)]}
      run = ', '.join(f'{key}={value!r}' for key, value in written_by.items() if value)
      raise CheckpointError(f'{self.step_directory(step)} does not fit this run: '
                            f'{join_problems(problems)}' +
                            (f' (it was written by a run with {run})' if run else ''))

  def _read(self, step: int, read):
    """`read()`, with any failure to read the files turned into an error naming the file."""
    try:
      return read()
    except Exception as err:  # Orbax, tensorstore and grain each raise their own error types
      raise CheckpointError(_unreadable(self.step_directory(step), err)) from None


def _unreadable(step_directory: str, err: Exception) -> str:
  """The message for a checkpoint that failed to read: tensorstore's errors name the file;
  a JSON decoding error does not, so the step's JSON files are parsed to find it."""
  named = re.findall(r'local file "([^"]+)"', str(err))
  culprit = named[-1] if named else next(
      (path for path in _json_files(step_directory) if not _parses_as_json(path)), None)
  detail = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
  if culprit:
    damage = 'is corrupt or truncated' if epath.Path(culprit).exists() else 'is missing'
    return f'{culprit} {damage} ({detail})'
  return f'{step_directory} could not be restored ({detail})'


def _json_files(step_directory: str):
  """Orbax's layout: every file is JSON but the array data (`d/` folders, `*.ocdbt`) and the
  `commit_success.txt` markers."""
  for folder, _, files in epath.Path(step_directory).walk():
    if folder.name != 'd':
      yield from (str(folder / name) for name in sorted(files)
                  if not name.endswith(('.ocdbt', '.txt')))


def _parses_as_json(path: str) -> bool:
  try:
    json.loads(epath.Path(path).read_text(encoding='utf-8'))
    return True
  except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    return False


def abstract_like(tree):
  """Shapes, dtypes and shardings of a tree of arrays: what `restore` places onto."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# What a resumed run may change: how it is watched, kept and laid out, not what it computes
# (the mesh may differ: restore places the state on the new one).
RESUMABLE_CHANGES = ('log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
                     'keep_checkpoints', 'keep_best', 'test_metric', 'test_split', 'test_limit',
                     'test_checkpoint', 'test_before',
                     'max_new_tokens', 'mesh',
                     'rules', 'distributed', 'remat', 'data.data_dir', 'loss_positions',
                     'attention', 'peak_tflops')


def config_changes(saved: dict, current: dict) -> list[str]:
  """'key: saved -> current' for every key of the run's config that differs from the saved one,
  other than RESUMABLE_CHANGES (the JSON round trip turns tuples into lists on both sides).
  The methods are compared as their constructor calls, one line for all of their fields."""
  methods = [[m.call_string() for m in methods_of(config)] for config in (saved, current)]
  changes = [f'peft: {methods[0]!r} -> {methods[1]!r}'] if methods[0] != methods[1] else []
  def flat(config):
    return traverse_util.flatten_dict(json.loads(json.dumps(config)), sep='.')
  saved, current = flat(saved), flat(current)
  method_field = lambda key: key.startswith('peft.') and '.optimizer.' not in key
  return changes + [f'{key}: {saved.get(key)!r} -> {current.get(key)!r}'
                    for key in sorted(set(saved) | set(current))
                    if key not in RESUMABLE_CHANGES and not method_field(key)
                    and saved.get(key) != current.get(key)]
