"""The rows a metric scores when it is given a limit: a fixed subset, the same every time."""

from __future__ import annotations

import numpy as np

SUBSET_SEED = 0


def subset(count: int, limit: int) -> np.ndarray:
  """Indices of the rows scored: all (`limit` 0 or ≥ `count`), or `limit` of them drawn without
  replacement by a fixed seed, in file order: the same at every evaluation of a run and across
  runs, so periodic scores are comparable."""
  if not limit or limit >= count:
    return np.arange(count)
  return np.sort(np.random.default_rng(SUBSET_SEED).permutation(count)[:limit])
