"""The static number of loss positions a row whose logits a train step computes.

`config.loss_positions`: 'auto' reads the first `SAMPLE_BATCHES` batches of the
run's own data (the iterator is put back where it was, so the run sees the same
batches), takes the most loss positions any row had, adds a quarter, and rounds
up to a multiple of 8; 'all' computes every position's logits; a number sets
the budget. A batch that overflows the budget is still computed exactly (by
every position, `train/loss.py`) and counted in the metrics. Every process
reads its own rows, so the processes agree on the largest budget any of them
derived: the compiled step must be the same everywhere.
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from additive_jax.model.config import ConfigError

SAMPLE_BATCHES = 16
_MARGIN = 1.25


def check_setting(setting: str) -> None:
  if setting in ('auto', 'all') or (setting.isdigit() and int(setting) > 0):
    return
  raise ConfigError(f"config.loss_positions must be 'auto', 'all' or a positive number of "
                    f'positions a row, got {setting!r}')


def derive_budget(setting: str, iterator, seq_len: int) -> int | None:
  """Loss positions a row (None: every position), from `setting` and the data."""
  check_setting(setting)
  if setting == 'all':
    return None
  if setting != 'auto':
    return min(int(setting), seq_len)
  state = iterator.get_state()
  most = 0
  for _ in range(SAMPLE_BATCHES):
    try:
      batch = next(iterator)
    except StopIteration:
      break
    most = max(most, int(np.max(np.sum(np.asarray(batch['loss_mask']) != 0, axis=1))))
  iterator.set_state(state)
  return budget_for(int(np.max(multihost_utils.process_allgather(np.asarray(most)))), seq_len)


def budget_for(most: int, seq_len: int) -> int | None:
  """The budget for rows of at most `most` loss positions: a quarter more, a multiple of 8;
  None (every position) where that is three quarters of the row or more, which saves too
  little to be worth a branch."""
  budget = -(-int(np.ceil(most * _MARGIN)) // 8) * 8
  return None if budget >= 0.75 * seq_len else max(budget, 8)
