"""When a preempted or interrupted run saves and stops: SIGTERM or Ctrl-C (SIGINT).

A preemptible worker gets SIGTERM some time before it is killed. The trainer then
finishes the step it is in, saves a checkpoint, and exits 0; the next launch with
the same workdir resumes from it exactly. On several processes
(`jax.distributed`), JAX's preemption service hears the signal on whichever host
gets it and `multihost_utils.reached_preemption_sync_point` names one step at
which all of them stop, so they save the same checkpoint together. A single
process, where that service does not run, installs its own SIGTERM handler.

A single process treats Ctrl-C the same way: the first SIGINT finishes the step
and saves it (the command then exits 130, the shell's code for an interrupt), a
second one stops at once (KeyboardInterrupt), unsaved. On several processes
SIGINT keeps Python's default: one process stopping alone at a step the others
do not would leave them waiting on it.
"""

from __future__ import annotations

import importlib
import signal
import sys

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
    self.signal_name = None  # of the signal heard first: 'SIGTERM' or 'SIGINT'
    self.interrupts = 0
    self.previous = {}
    for signum in () if self.synced else (signal.SIGTERM, signal.SIGINT):
      try:
        self.previous[signum] = signal.signal(signum, self._request)
      except ValueError:  # not the main thread, where Python cannot take signals: none heard
        pass

  @property
  def cause(self) -> str:
    """What stopped the run, in the words its last line says."""
    return 'interrupted (Ctrl-C)' if self.signal_name == 'SIGINT' else 'preempted'

  def _request(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self.interrupts += 1
      if self.interrupts > 1:  # the second Ctrl-C: the user will not wait for the save
        raise KeyboardInterrupt
      print('interrupted (Ctrl-C): the step in flight finishes and is saved; Ctrl-C again stops '
            'at once, unsaved', file=sys.stderr, flush=True)
    self.signal_name = self.signal_name or signal.Signals(signum).name  # acted on after the step

  def reached(self, step: int) -> bool:
    """Whether this run should save at `step` and stop."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

  def close(self) -> None:
    for signum, previous in self.previous.items():
      if previous is not None:  # None: a handler installed outside Python, not restorable
        signal.signal(signum, previous)
    self.previous = {}
