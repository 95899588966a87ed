"""Orbax checkpoints of a run: the trainable state, the data iterator, the config.

A checkpoint holds `TrainState` (the step, `variables['peft']` and its optimizer
state), the grain iterator's position and the run's config as JSON; never the
frozen base, which is re-read from its own checkpoint. Orbax writes each save
into a temporary folder and renames it when complete, so a save killed half-way
leaves the previous checkpoint as the latest usable one. Saves are asynchronous:
training continues while the arrays are written.

Retention keeps the latest `keep` checkpoints *and* the `keep_best` best by the
configured eval metric (Orbax preservation policies combined), so resuming never
loses the newest step and the best one survives later, worse evaluations.

Restoring takes the abstract state of the current run (shapes, dtypes and
shardings) and places every array on the current mesh, whatever mesh saved it.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

ITEMS = ('state', 'data', 'config')


class _IteratorSnapshot:
  """The iterator's position when `save` was called; an async save may write it later,
  after the live iterator has moved on. grain's handler writes `get_state().decode()`."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpoints:
  """`save` / `restore` of a run's state in `directory` (a folder of the workdir)."""

  def __init__(self, directory: str, keep: int = 2, keep_best: int = 1,
               best_metric: str = 'eval_loss', best_mode: str = 'min'):
    if best_mode not in ('min', 'max'):
      raise ValueError(f"checkpoint best_mode must be 'min' or 'max', got {best_mode!r}")
    self.best_metric = best_metric
    policies = [preservation_policy.LatestN(keep)]
    if keep_best:
      policies.append(preservation_policy.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min',
          n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, config: dict, metrics: dict | None = None) -> None:
    """Starts an async save; `metrics` (with `best_metric`) ranks it for keep-best."""
    if metrics is not None and self.best_metric not in metrics:
      metrics = None  # not an evaluation step: kept by recency alone
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator)),
        config=ocp.args.JsonSave(config)), metrics=metrics)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state saved at `step`, on the shardings of `abstract_state`; moves the iterator."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    """Blocks until the last async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree):
  """Shapes, dtypes and shardings of a tree of arrays: what `restore` places onto."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
