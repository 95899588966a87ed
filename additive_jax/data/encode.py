"""Token-id segments to a training example: shifted targets, the loss mask, the over-long policy.

An example's segments (data/templates.py) concatenate to ids x_0..x_n, each id
marked target or not (a response, an assistant turn, its EOS):

    tokens    = x_0 .. x_{n-1}
    targets   = x_1 .. x_n                       (the next token)
    loss_mask = 1.0 where the target x_{i+1} is a target id, 0.0 elsewhere

so an example of n + 1 ids fills n positions, and a row of `seq_len` positions
holds at most `seq_len + 1` ids. An example always ends with a target segment
(the response, the last assistant turn). Longer examples follow the over-long
policy:

* `truncate`: drop ids from the left of what comes before the last target
  segment (the prompt; the start of a conversation), keeping that segment whole;
  a last segment that alone is still too long keeps its first `seq_len + 1` ids
  (language modelling, where the prompt is empty; its EOS is then lost).
* `drop`: leave the example out (counted).
* `error`: stop, naming the file and line of the first one.

`length_census` counts kept, truncated and dropped examples before a run
starts, so the counts can be reported and `error` fails at once.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import grain
import numpy as np

from additive_jax.data.readers import Line
from additive_jax.data.templates import SegmentEncoder, Segments

OVER_LONG_POLICIES = ('truncate', 'drop', 'error')
_CENSUS_CHUNK = 1024  # records tokenized per call (the backend encodes a batch in parallel)


def check_policy(policy: str) -> None:
  if policy not in OVER_LONG_POLICIES:
    raise ValueError(f'unknown over-long policy {policy!r} (policies: '
                     f'{", ".join(OVER_LONG_POLICIES)})')


def length(segments: Segments) -> int:
  return sum(len(ids) for ids, _ in segments)


def fit(segments: Segments, max_ids: int, policy: str) -> Segments | None:
  """The segments cut to at most `max_ids` ids under `policy`; None when the example is dropped.

  The census has already stopped the run under `error`, so any other policy
  than `drop` truncates here. Every segment stays, possibly emptied.
  """
  if length(segments) <= max_ids:
    return segments
  if policy == 'drop':
    return None
  *context, (last, is_target) = segments
  last = last[:max_ids]
  budget, kept = max_ids - len(last), []
  for ids, target in reversed(context):  # from the right: the left end goes first
    take = min(budget, len(ids))
    kept.append((ids[len(ids) - take:], target))
    budget -= take
  return kept[::-1] + [(last, is_target)]


def example_arrays(segments: Segments) -> dict[str, np.ndarray]:
  """tokens, targets (int32) and loss_mask (float32), each of length len(ids) - 1."""
  ids = np.asarray([i for piece, _ in segments for i in piece], np.int32)
  is_target = np.repeat(np.asarray([target for _, target in segments], np.float32),
                        [len(piece) for piece, _ in segments])
  return {'tokens': ids[:-1], 'targets': ids[1:], 'loss_mask': is_target[1:]}


def example_of(record) -> dict:
  """A TFDS record's example: its pair of texts, or its conversation."""
  if 'messages' in record:
    return {'messages': json.loads(record['messages'])}
  return {'prompt': record['prompt'].decode('utf-8'),
          'response': record['response'].decode('utf-8')}


class EncodeRecord(grain.transforms.Map):
  """A TFDS record → `example_arrays`, or None when the over-long policy drops it."""

  def __init__(self, encoder: SegmentEncoder, max_ids: int, policy: str):
    self.encoder, self.max_ids, self.policy = encoder, max_ids, policy

  def map(self, record):
    [segments] = self.encoder([example_of(record)])
    fitted = fit(segments, self.max_ids, self.policy)
    return None if fitted is None else example_arrays(fitted)


@dataclasses.dataclass(frozen=True)
class LengthReport:
  kept: int        # fit as they are
  truncated: int   # cut to fit (policy truncate)
  dropped: int     # left out (policy drop)
  max_ids: int

  def __str__(self):
    return (f'{self.kept + self.truncated + self.dropped} examples: {self.kept} kept, '
            f'{self.truncated} truncated, {self.dropped} dropped (longer than '
            f'{self.max_ids} tokens = seq_len + 1)')


def length_census(source, indices: Sequence[int], encoder: SegmentEncoder, max_ids: int,
                  policy: str, path: str) -> LengthReport:
  """Encodes the records at `indices` once and counts what the policy does; `error` raises here.

  Reads in chunks through the TFDS source's batch read, several times faster
  than record by record. `policy` is one of OVER_LONG_POLICIES (see check_policy).
  """
  over_long: list[tuple[Line, int]] = []  # (line, ids)
  kept = 0
  for start in range(0, len(indices), _CENSUS_CHUNK):
    chunk = source.__getitems__(indices[start:start + _CENSUS_CHUNK])
    for record, segments in zip(chunk, encoder([example_of(record) for record in chunk])):
      ids = length(segments)
      if ids <= max_ids:
        kept += 1
      else:
        over_long.append((Line(int(record['line']), int(record['column'])), ids))
  if over_long and policy == 'error':
    line, ids = over_long[0]
    raise ValueError(f'{path}:{line}: example of {ids} tokens is longer than seq_len + 1 = '
                     f'{max_ids} ({len(over_long)} such examples; over_long policy '
                     "'truncate' or 'drop' accepts them)")
  truncated = len(over_long) if policy == 'truncate' else 0
  return LengthReport(kept, truncated, len(over_long) - truncated, max_ids)
