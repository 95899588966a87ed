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
batch_size / process_count). A mixture (`config.data.mixture`, data/mixture.py)
runs the first steps for each entry, with a seed of the entry's, and mixes the
encoded examples by weight (grain's `IterDataset.mix`) before packing.

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
from additive_jax.data.mixture import (TAG, MixtureBatches, MixtureReport, entry_seed,
                                       mixture_entries, tagged)
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


def _shard(data_config, spec, split: str, tokenizer, seq_len: int, process_index: int,
           process_count: int, cache_dir: str | None):
  """This process's records of `spec`'s split, the split's size, the shard's census, the
  record encoder."""
  check_policy(data_config.over_long)  # before a first preparation of the data, not after
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


def _examples(records: grain.MapDataset, encode, seed: int, num_epochs: int | None
              ) -> grain.IterDataset:
  """Shuffled (each epoch anew), repeated, encoded examples; one the over-long policy drops
  maps to None, which to_iter_dataset leaves out."""
  return records.shuffle(seed).repeat(num_epochs).map(encode).to_iter_dataset(_READ_OPTIONS)


def _mixed_examples(data_config, entries, tokenizer, seq_len: int, seed: int,
                    cache_dir: str | None) -> tuple[grain.IterDataset, MixtureReport]:
  """Each entry's examples, tagged with its number and mixed by share (data/mixture.py)."""
  streams, reports = {}, {}
  for number, entry in enumerate(entries, start=1):
    records, _, reports[entry.key], encode = _shard(data_config, entry.spec, data_config.split,
                                                    tokenizer, seq_len, 0, 1, cache_dir)
    streams[entry.key] = _examples(records, encode, entry_seed(seed, entry.key),
                                   data_config.num_epochs).map(
                                       functools.partial(tagged, number=number))
  # keyed by entry: the mixed iterator's state names each entry's position
  mixed = grain.IterDataset.mix(streams, {entry.key: entry.share for entry in entries})
  return mixed, MixtureReport(entries, reports)


def make_train_iterator(data_config: ml_collections.ConfigDict, tokenizer, *, batch_size: int,
                        seq_len: int, seed: int, process_index: int = 0, process_count: int = 1,
                        cache_dir: str | None = None
                        ) -> tuple[grain.DatasetIterator, LengthReport | MixtureReport]:
  """This process's rows, [batch_size // process_count, seq_len], of the one global stream of
  [batch_size, seq_len] batches of `split` (the module docstring: elastic): of
  `data_config.source`, or of the mixture `data_config.mixture` when it has entries."""
  rows = _rows_per_process(batch_size, process_count)
  entries = mixture_entries(data_config)  # a bad entry is named by its key before any reading
  if entries:
    examples, report = _mixed_examples(data_config, entries, tokenizer, seq_len, seed, cache_dir)
  else:
    records, _, report, encode = _shard(data_config, source_spec(data_config.source),
                                        data_config.split, tokenizer, seq_len, 0, 1, cache_dir)
    examples = _examples(records, encode, seed, data_config.num_epochs)
  extra = (TAG,) if entries else ()
  if data_config.packing:
    row_stream = packing.pack(examples, seq_len, batch_size, extra)
  else:
    row_stream = examples.map(functools.partial(packing.pad, seq_len=seq_len))
  mine = slice(process_index * rows, (process_index + 1) * rows)
  batches = row_stream.batch(batch_size, drop_remainder=True)
  if entries:
    return MixtureBatches(iter(batches), tuple(entry.key for entry in entries), mine), report
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
  records, num_records, report, encode = _shard(
      data_config, source_spec(data_config.source), data_config.eval_split, tokenizer, seq_len,
      process_index, process_count, cache_dir)
  longest_shard = -(-num_records // process_count)
  num_rows = -(-longest_shard // rows) * rows

  def row(index: int):
    example = encode.map(records[index]) if index < len(records) else None
    return packing.pad(packing.EMPTY_EXAMPLE if example is None else example, seq_len)

  return grain.MapDataset.range(num_rows).map(row).batch(rows), report
