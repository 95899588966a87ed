"""Rows of `seq_len` positions: several examples packed into one, or one example padded.

A row is a dict of [T] arrays: `tokens`, `targets` (int32), `loss_mask`
(float32), `positions`, `segment_ids` (int32). Padding has token 0, target 0,
loss mask 0 and segment 0; the model lets no real token attend to segment 0.

* Packed: grain's first-fit packing (`FirstFitPackIterDataset`) fills `rows`
  bins at a time in stream order; examples get segment ids 1, 2, 3, ... within a
  row and positions that restart at 0 in each, padding gets position 0.
* Padded: one example per row, segment id 1, positions `arange(T)` over the
  whole row, padding included (padding is masked, not renumbered), as in
  `transformers`.
"""

from __future__ import annotations

import grain
import numpy as np

_SEQUENCES = ('tokens', 'targets', 'loss_mask')


def pack(examples: grain.IterDataset, seq_len: int, rows: int,
         extra: tuple[str, ...] = ()) -> grain.IterDataset:
  """Packed rows; the packer emits `rows` bins at a time (one batch's worth). `extra` names
  more per-token features of the examples (a mixture's source tag), packed along the tokens."""
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={name: seq_len for name in _SEQUENCES + extra},
      num_packing_bins=rows, shuffle_bins=False,
      # they share the tokens' segments: pack them without their own copies
      meta_features=('targets', 'loss_mask') + extra)
  return packed.map(lambda row: {'tokens': row['tokens'], 'targets': row['targets'],
                                 'loss_mask': row['loss_mask'],
                                 'positions': row['tokens_positions'],
                                 'segment_ids': row['tokens_segment_ids'],
                                 **{name: row[name] for name in extra}})


def pad(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example at the start of a row of `seq_len` positions (each of its per-token features
  padded with 0)."""
  length = len(example['tokens'])
  row = {name: np.pad(values, (0, seq_len - length)) for name, values in example.items()}
  row['positions'] = np.arange(seq_len, dtype=np.int32)
  row['segment_ids'] = (np.arange(seq_len) < length).astype(np.int32)
  return row


EMPTY_EXAMPLE = {'tokens': np.zeros(0, np.int32), 'targets': np.zeros(0, np.int32),
                 'loss_mask': np.zeros(0, np.float32)}


def pad_fraction(batch: dict[str, np.ndarray]) -> float:
  """The fraction of a batch's positions that are padding (segment 0)."""
  return float(np.mean(batch['segment_ids'] == 0))
