"""Token ids to a training example: shifted targets, the loss mask, the over-long policy.

For an example whose ids are x_0..x_n (prompt, then response ending in EOS):

    tokens    = x_0 .. x_{n-1}
    targets   = x_1 .. x_n                       (the next token)
    loss_mask = 1.0 where the target is a response token (the final EOS included),
                0.0 where it is a prompt token

so an example of n + 1 ids fills n positions, and a row of `seq_len` positions
holds at most `seq_len + 1` ids. Longer examples follow the over-long policy:

* `truncate`: drop prompt tokens from the left, keeping the response whole; a
  response that alone is still too long keeps its first `seq_len + 1` ids
  (language modelling, where the prompt is empty; its EOS is then lost).
* `drop`: leave the example out (counted).
* `error`: stop, naming the file and line of the first one.

`length_census` counts kept, truncated and dropped examples before a run
starts, so the counts can be reported and `error` fails at once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from additive_jax.data.templates import PairEncoder

OVER_LONG_POLICIES = ('truncate', 'drop', 'error')
_CENSUS_CHUNK = 1024  # records tokenized per call (the backend encodes a batch in parallel)


def check_policy(policy: str) -> None:
  if policy not in OVER_LONG_POLICIES:
    raise ValueError(f'unknown over-long policy {policy!r} (policies: '
                     f'{", ".join(OVER_LONG_POLICIES)})')


def fit(prompt_ids: list[int], response_ids: list[int], max_ids: int,
        policy: str) -> tuple[list[int], list[int]] | None:
  """The ids cut to at most `max_ids` under `policy`; None when the example is dropped.

  The census has already stopped the run under `error`, so any other policy
  than `drop` truncates here.
  """
  if len(prompt_ids) + len(response_ids) <= max_ids:
    return prompt_ids, response_ids
  if policy == 'drop':
    return None
  keep_prompt = max(max_ids - len(response_ids), 0)
  return prompt_ids[len(prompt_ids) - keep_prompt:], response_ids[:max_ids]


def example_arrays(prompt_ids: list[int], response_ids: list[int]) -> dict[str, np.ndarray]:
  """tokens, targets (int32) and loss_mask (float32), each of length len(ids) - 1."""
  ids = np.asarray(prompt_ids + response_ids, np.int32)
  loss_mask = np.zeros(len(ids) - 1, np.float32)
  loss_mask[max(len(prompt_ids) - 1, 0):] = 1.0  # targets ids[len(prompt):] are the response
  return {'tokens': ids[:-1], 'targets': ids[1:], 'loss_mask': loss_mask}


def _texts(record) -> tuple[str, str]:
  return record['prompt'].decode('utf-8'), record['response'].decode('utf-8')


class EncodeRecord(grain.transforms.Map):
  """A TFDS record → `example_arrays`, or None when the over-long policy drops it."""

  def __init__(self, encoder: PairEncoder, max_ids: int, policy: str):
    self.encoder, self.max_ids, self.policy = encoder, max_ids, policy

  def map(self, record):
    prompt, response = _texts(record)
    [(prompt_ids, response_ids)] = self.encoder([prompt], [response])
    fitted = fit(prompt_ids, response_ids, self.max_ids, self.policy)
    return None if fitted is None else example_arrays(*fitted)


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


def length_census(source, indices: Sequence[int], encoder: PairEncoder, max_ids: int,
                  policy: str, path: str) -> LengthReport:
  """Encodes the records at `indices` once and counts what the policy does; `error` raises here.

  Reads in chunks through the TFDS source's batch read, several times faster
  than record by record. `policy` is one of OVER_LONG_POLICIES (see check_policy).
  """
  over_long: list[tuple[int, int]] = []  # (line, ids)
  kept = 0
  for start in range(0, len(indices), _CENSUS_CHUNK):
    chunk = source.__getitems__(indices[start:start + _CENSUS_CHUNK])
    encoded = encoder(*zip(*map(_texts, chunk)))
    for record, (prompt_ids, response_ids) in zip(chunk, encoded):
      length = len(prompt_ids) + len(response_ids)
      if length <= max_ids:
        kept += 1
      else:
        over_long.append((int(record['line']), length))
  if over_long and policy == 'error':
    line, length = over_long[0]
    raise ValueError(f'{path}:{line}: example of {length} tokens is longer than seq_len + 1 = '
                     f'{max_ids} ({len(over_long)} such examples; over_long policy '
                     "'truncate' or 'drop' accepts them)")
  truncated = len(over_long) if policy == 'truncate' else 0
  return LengthReport(kept, truncated, len(over_long) - truncated, max_ids)
