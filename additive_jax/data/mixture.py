"""Training on a weighted mixture of declared sources (`config.data.mixture`).

    c.data.mixture.sst2 = mixture_entry('sst2', weight=0.5)   # data/config.py
    c.data.mixture.trec = mixture_entry('trec', weight=0.5)
    --config.data.mixture.trec.weight=2                        # on a command line

Each entry is a full source declaration (a built-in's name, or files and
templates of your own), checked as `config.data.source` is and named by its key
(`config.data.mixture.trec.format ...`), with a positive `weight`. Weights are
relative: each entry's share of the examples is its weight over their sum. The
train stream (data/pipeline.py) reads every entry's `config.data.split`; the run
still evaluates and tests `config.data.source` alone, its primary source, which
need not be an entry (train on a mixture, test on a held-out task).

Mixing is grain's `IterDataset.mix`, before packing, on the examples each entry
keeps after the over-long policy: it interleaves deterministically, so after any
k examples an entry's count is within a few examples of k × its share (at most
the number of entries, measured; grain rounds the weights to whole numbers, the
smallest 100, so the shares are exact to about 1%). What is random is each
entry's order, shuffled with a seed of its own. A row may pack examples of
several entries; its segments keep them apart. Mixing examples rather than
packed rows makes the weights shares of examples, whatever their lengths. The
examples carry a per-token `source` tag through the packer, which
`MixtureBatches` counts and takes out of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping
import zlib

import grain
import numpy as np

from additive_jax.data.declarations import source_spec
from additive_jax.data.encode import LengthReport
from additive_jax.data.spec import SourceSpec
from additive_jax.data.templates import check_template

KEY = 'config.data.mixture'
TAG = 'source'  # the per-token feature naming an example's entry: 1, 2, ... (0 is padding)


@dataclasses.dataclass(frozen=True)
class Entry:
  key: str           # its key in config.data.mixture
  spec: SourceSpec
  share: float       # its weight over the sum of the weights


def mixture_entries(data_config) -> tuple[Entry, ...]:
  """The entries of `data_config.mixture` (none: the run trains on `data_config.source`),
  checked: every mistake named by its key, before any file is read."""
  mixture = data_config.get('mixture')  # a config saved before mixtures has none
  mixture = mixture.to_dict() if hasattr(mixture, 'to_dict') else mixture
  if not mixture:
    return ()
  if not isinstance(mixture, Mapping):
    raise ValueError(f"{KEY} must map entry names to entries, e.g. {{'trec': "
                     f"mixture_entry('trec', weight=0.5)}}, got {mixture!r}")
  weights, specs = {}, {}
  for name, entry in sorted(mixture.items()):
    key = f'{KEY}.{name}'
    if not isinstance(entry, Mapping):
      raise ValueError(f'{key} must be a source declaration with a weight, e.g. '
                       f"mixture_entry('trec', weight=0.5), got {entry!r}")
    weight = entry.get('weight')
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight <= 0):
      raise ValueError(f'{key}.weight must be positive (a finite number, relative to the other '
                       f'entries\' weights), got {weight!r}')
    specs[name] = source_spec({k: v for k, v in entry.items() if k != 'weight'}, key)
    check_template(specs[name], data_config.template)
    try:
      specs[name].path(data_config.data_dir, data_config.split)
    except ValueError as err:  # a split the entry does not declare
      raise ValueError(f'{key} (config.data.split={data_config.split!r}): {err}') from None
    weights[name] = float(weight)
  total = sum(weights.values())
  return tuple(Entry(name, specs[name], weights[name] / total) for name in weights)


def entry_seed(seed: int, key: str) -> int:
  """The shuffle seed of an entry: the run's seed and the entry's key (not its place among the
  entries, so adding an entry leaves the others' orders as they were); in [0, 2**32)."""
  return zlib.crc32(f'{seed} {key}'.encode())


def tagged(example: dict, number: int) -> dict:
  """The example with its entry's number on every token (`TAG`)."""
  return {**example, TAG: np.full(len(example['tokens']), number, np.int32)}


@dataclasses.dataclass(frozen=True)
class MixtureReport:
  """Each entry's share and its split's kept / truncated / dropped counts."""
  entries: tuple[Entry, ...]
  reports: Mapping[str, LengthReport]

  def __str__(self):
    return '; '.join(f'{e.key} ({e.spec.name}, share {e.share:.3g}) {self.reports[e.key]}'
                     for e in self.entries)


class MixtureBatches(grain.DatasetIterator):
  """Global batches of the mixed stream → this process's rows, without the tag; counts each
  entry's examples in the global batches. The counts are in the state (the same on every
  process), so a resumed run goes on counting."""

  def __init__(self, parent: grain.DatasetIterator, keys: tuple[str, ...], mine: slice):
    super().__init__(parent)
    self.keys, self._mine = keys, mine
    self.examples = dict.fromkeys(keys, 0)

  def __next__(self):
    batch = dict(next(self._parent))
    source_BT = batch.pop(TAG)
    # an example's first position: position 0 of a segment (padding is segment 0)
    starts_BT = (batch['positions'] == 0) & (batch['segment_ids'] > 0)
    counts = np.bincount(source_BT[starts_BT], minlength=len(self.keys) + 1)
    for key, count in zip(self.keys, counts[1:]):
      self.examples[key] += int(count)
    return {name: rows_BT[self._mine] for name, rows_BT in batch.items()}

  def get_state(self):
    return {'batches': self._parent.get_state(), 'examples': dict(self.examples)}

  def set_state(self, state):
    self._parent.set_state(state['batches'])
    self.examples = {key: int(state['examples'].get(key, 0)) for key in self.keys}


class ShareLog:
  """The realized share of each entry among the examples the trainer took: since the last
  `window()` (a log line's `share_<entry>`), and over the run (`totals()`). Empty for a run
  that trains on one source."""

  def __init__(self, iterator):
    self._iterator = iterator if isinstance(iterator, MixtureBatches) else None
    self._last = dict(iterator.examples) if self._iterator else {}

  def window(self) -> dict[str, float]:
    if self._iterator is None:
      return {}
    now = dict(self._iterator.examples)
    seen = {key: now[key] - self._last.get(key, 0) for key in now}
    self._last = now
    return {f'share_{key}': count / max(1, sum(seen.values())) for key, count in seen.items()}

  def totals(self) -> dict:
    if self._iterator is None:
      return {}
    examples = dict(self._iterator.examples)
    total = max(1, sum(examples.values()))
    return {'mixture_examples': examples,
            'mixture_shares': {key: count / total for key, count in examples.items()}}
