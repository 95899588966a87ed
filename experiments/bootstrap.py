"""The paired bootstrap of two sweep settings over the test rows they were both scored on.

A row's outcome on a side is its hits averaged over that side's seeds; the statistic is the
mean over rows of A's minus B's outcome (the metric difference A − B), and its 95% interval
the 2.5th and 97.5th percentiles of that mean over 10,000 resamples of the rows (with
replacement, numpy seed 0). Resampling rows asks how much the difference depends on which
test rows were drawn; seeds enter only through the averaging.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
INDEX_ELEMENTS = 1 << 22  # resampled row indices drawn at once (32 MiB of int64)


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
  """A − B over rows, from seeds × rows hits of each side: the difference, the 95% percentile
  interval of the rows resampled with replacement, and the fraction of resamples at most 0."""
  per_row = hits_a.mean(axis=0) - hits_b.mean(axis=0)
  rows = per_row.size
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  chunk = max(1, INDEX_ELEMENTS // rows)  # resamples per draw, so the index matrix stays bounded
  for start in range(0, resamples, chunk):
    stop = min(start + chunk, resamples)
    means[start:stop] = per_row[rng.integers(0, rows, size=(stop - start, rows))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return {'difference': float(per_row.mean()), 'low': float(low), 'high': float(high),
          'at_most_zero': float(np.mean(means <= 0)), 'rows': rows, 'resamples': resamples}


def stacked_hits(row: dict) -> tuple[np.ndarray, dict]:
  """A setting's seeds × rows hits and what they were scored on; its seeds must agree."""
  name, missing = row['names'][0], [p for p, h in zip(row['points'], row['hits']) if h is None]
  if missing:
    raise ValueError(f'{name}: {", ".join(missing)} wrote no test_hits.json')
  scored = [{'metric': h['metric'], 'source': h.get('source'), 'split': h['split'],
             'limit': h['limit'],
             'rows': len(h['hits'])} for h in row['hits']]
  if any(s != scored[0] for s in scored):
    raise ValueError(f'{name}: its seeds were tested on different rows: {scored}')
  return np.array([h['hits'] for h in row['hits']], dtype=np.float64), scored[0]


def compare(rows: list[dict], a: str, b: str) -> dict:
  """The paired bootstrap of the settings named `a` and `b` (see the module docstring)."""
  def find(name):  # a setting's name, else the start of one (up to a `_`)
    found = ([r for r in rows if name in r['names']] or
             [r for r in rows if any(n.startswith(f'{name}_') for n in r['names'])])
    if len(found) != 1:
      known = ', '.join(n for r in (found or rows) for n in r['names'])
      raise ValueError(f'--pair {a},{b}: {name!r} names {len(found)} finished settings (one is '
                       f'needed): {known}')
    return found[0]
  row_a, row_b = find(a), find(b)
  a, b = row_a['names'][0], row_b['names'][0]  # as the table names them
  (hits_a, scored_a), (hits_b, scored_b) = stacked_hits(row_a), stacked_hits(row_b)
  differ = [f'{k} {scored_a[k]!r} vs {scored_b[k]!r}' for k in scored_a
            if scored_a[k] != scored_b[k]]
  if differ:
    raise ValueError(f'cannot pair {a} with {b}: their test hits differ in {"; ".join(differ)}')
  return {'a': a, 'b': b, 'metric': scored_a['metric'], 'seeds_a': len(hits_a),
          'seeds_b': len(hits_b), **paired_bootstrap(hits_a, hits_b)}
