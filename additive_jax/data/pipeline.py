"""The data entry points: a checkpointable train iterator and evaluation batches.

    iterator, report = make_train_iterator(config.data, tokenizer, batch_size=8, seq_len=256,
                                           seed=0, process_index=jax.process_index(),
                                           process_count=jax.process_count())
    print(report)           # kept / truncated / dropped examples of this process's shard
    batch = next(iterator)  # tokens, targets, loss_mask, positions, segment_ids: [B, T] numpy

`batch_size` is global: each process yields `batch_size // process_count` rows.
The grain pipeline: the split's TFDS records → shuffle with `seed`, differently
each epoch → repeat `num_epochs` times (None: forever) → template, tokenize, mask
(in a grain reader thread) → pack or pad into rows → batches of `batch_size`
rows → this process's rows of each (process p: rows p·r … (p+1)·r − 1, r =
batch_size / process_count).

Elastic. Every process computes the same global stream (one example order, one
deterministic packing into the batch's rows) and keeps its own rows, so a step's
global batch does not depend on the process count, and neither does the
iterator's state: a run saved by N processes resumes with M and sees the same
examples in the same order. (Each process tokenizes the whole stream: text is
cheap next to a train step.)

`iterator.get_state()` / `set_state(state)` (a small JSON-able dict, the same on
every process) resume the stream exactly. Take the state when the step is saved,
not when the save is written: an asynchronous Orbax save writes later, after the
live iterator has moved on. train/checkpoint.py saves a snapshot of `get_state()`
taken at `save` as JSON and restores it with `set_state`.

Evaluation shards by process: `make_eval_batches` pads every example to its own row
and fills each process's last batches with empty rows, so that every process
has the same number of batches and every example counts once.
"""

from __future__ import annotations

import functools

import grain
import ml_collections

from additive_jax.data import packing, tfds_builders
from additive_jax.data.encode import EncodeRecord, LengthReport, check_policy, length_census
from additive_jax.data.sources import source_spec
from additive_jax.data.templates import SegmentEncoder, check_template


# One reader thread prepares examples while the train step runs. Reading a record
# and tokenizing it hold the GIL, so more threads only contend for it (on 2 cores:
# 2.8k examples/s with one thread, 1.3k with grain's default 16).
_READ_OPTIONS = grain.ReadOptions(num_threads=1)


def _rows_per_process(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {process_count} processes')
  return batch_size // process_count


def _shard(data_config, split: str, tokenizer, seq_len: int, process_index: int,
           process_count: int, cache_dir: str | None):
  """This process's records, the split's size, the shard's census, the record encoder."""
  check_policy(data_config.over_long)  # before a first preparation of the data, not after
  spec = source_spec(data_config.source)
  check_template(spec, data_config.template)
  encoder = SegmentEncoder(tokenizer, data_config.template)
  source = tfds_builders.data_source(spec, split, data_config.data_dir, cache_dir)
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)
  shard_slice = slice(shard.shard_index, None, shard.shard_count)
  records = grain.MapDataset.source(source)[shard_slice]
  path = spec.path(data_config.data_dir, split)
  report = length_census(source, range(len(source))[shard_slice], encoder, seq_len + 1,
                         data_config.over_long, path)
  return records, len(source), report, EncodeRecord(encoder, seq_len + 1, data_config.over_long)


def make_train_iterator(data_config: ml_collections.ConfigDict, tokenizer, *, batch_size: int,
                        seq_len: int, seed: int, process_index: int = 0, process_count: int = 1,
                        cache_dir: str | None = None
                        ) -> tuple[grain.DatasetIterator, LengthReport]:
  """This process's rows, [batch_size // process_count, seq_len], of the one global stream of
  [batch_size, seq_len] batches of `split` (the module docstring: elastic)."""
  rows = _rows_per_process(batch_size, process_count)
  records, _, report, encode = _shard(data_config, data_config.split, tokenizer, seq_len,
                                      0, 1, cache_dir)
  # A dropped example maps to None, which to_iter_dataset leaves out.
  examples = (records.shuffle(seed).repeat(data_config.num_epochs).map(encode)
              .to_iter_dataset(_READ_OPTIONS))
  if data_config.packing:
    row_stream = packing.pack(examples, seq_len, batch_size)
  else:
    row_stream = examples.map(functools.partial(packing.pad, seq_len=seq_len))
  mine = slice(process_index * rows, (process_index + 1) * rows)
  batches = row_stream.batch(batch_size, drop_remainder=True)
  return iter(batches.map(lambda batch: {name: rows_BT[mine] for name, rows_BT in batch.items()})
              ), report


def make_eval_batches(data_config: ml_collections.ConfigDict, tokenizer, *, batch_size: int,
                      seq_len: int, process_index: int = 0, process_count: int = 1,
                      cache_dir: str | None = None) -> tuple[grain.MapDataset, LengthReport]:
  """`eval_split` once, in file order, one example per row: a grain.MapDataset of batches.

  Every process gets ceil(ceil(N / process_count) / rows) batches; rows past
  its shard, and examples the `drop` policy leaves out, are empty (loss mask 0).
  """
  rows = _rows_per_process(batch_size, process_count)
  records, num_records, report, encode = _shard(data_config, data_config.eval_split, tokenizer,
                                                seq_len, process_index, process_count, cache_dir)
  longest_shard = -(-num_records // process_count)
  num_rows = -(-longest_shard // rows) * rows

  def row(index: int):
    example = encode.map(records[index]) if index < len(records) else None
    return packing.pad(packing.EMPTY_EXAMPLE if example is None else example, seq_len)

  return grain.MapDataset.range(num_rows).map(row).batch(rows), report
