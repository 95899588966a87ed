"""When a preempted run saves and stops: SIGTERM, agreed on by every process.

A preemptible worker gets SIGTERM some time before it is killed. The trainer then
finishes the step it is in, saves a checkpoint, and exits 0; the next launch with
the same workdir resumes from it exactly. On several processes
(`jax.distributed`), JAX's preemption service hears the signal on whichever host
gets it and `multihost_utils.reached_preemption_sync_point` names one step at
which all of them stop, so they save the same checkpoint together. A single
process, where that service does not run, installs its own SIGTERM handler.
"""

from __future__ import annotations

import importlib
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils


def _sync_service_running() -> bool:
  """Whether JAX's preemption service runs in this process. Its state is private jax API
  (`jax._src.distributed`), read here, when a run starts, so that a jax which moves it
  costs the shared stop and nothing else."""
  try:
    distributed = importlib.import_module('jax._src.distributed')
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError) as err:
    logging.warning('preemption: jax %s has no jax._src.distributed.global_state.'
                    'preemption_sync_manager (%s); each process hears SIGTERM alone',
                    jax.__version__, err)
    return False


class Preemption:
  """`preemption.reached(step)` after every step, on every process; `close()` at the end."""

  def __init__(self):
    self.synced = jax.process_count() > 1 and _sync_service_running()
    self.requested = False
    self.previous = None
    if not self.synced:
      try:
        self.previous = signal.signal(signal.SIGTERM, self._request)
      except ValueError:  # not the main thread, where Python cannot take signals: none heard
        self.previous = None

  def _request(self, signum, frame):
    del signum, frame
    self.requested = True  # acted on after the step in flight

  def reached(self, step: int) -> bool:
    """Whether this run should save at `step` and stop."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None
