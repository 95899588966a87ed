"""Throughput of the data loader on SST-2 train, packed and padded.

    .venv/bin/python benchmarks/data_throughput.py [--batches=200] [--batch_size=8] [--seq_len=256]

For each mode: the start-up time (TFDS preparation if needed, and the length
census), then examples/s and real (non-padding) tokens/s over `--batches`
batches after the first, and the pad fraction. It compares the time to load one
batch with one SmolLM2-135M CPU train step on 8 x 256 tokens (~11 s on 2 cores,
forward and backward, measured with the trainer at that shape), and writes the table as JSON to
benchmarks/results/data_throughput.json.
"""

import json
import os
import time

from absl import app, flags
import numpy as np

import additive_jax as aj
from additive_jax.data.config import data_config
from additive_jax.data.packing import pad_fraction
from additive_jax.data.pipeline import make_train_iterator

_BATCHES = flags.DEFINE_integer('batches', 200, 'batches timed after the first')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'rows per batch')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'positions per row')
_CPU_STEP_S = 11.0  # SmolLM2-135M forward + backward on 8 x 256 tokens, 2 CPU cores


def examples_in(batch) -> int:
  """Packed segments, or padded rows, of a batch (segment ids are 1, 2, ... within a row)."""
  return int(batch['segment_ids'].max(axis=1).sum())


def measure(tokenizer, packing: bool) -> dict:
  config = data_config()
  config.packing = packing
  started = time.perf_counter()
  iterator, report = make_train_iterator(config, tokenizer, batch_size=_BATCH_SIZE.value,
                                         seq_len=_SEQ_LEN.value, seed=0)
  next(iterator)  # the first batch waits for the reader thread to start
  startup_s = time.perf_counter() - started
  examples = tokens = 0
  pad = []
  started = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
    examples += examples_in(batch)
    tokens += int((batch['segment_ids'] > 0).sum())
    pad.append(pad_fraction(batch))
  elapsed = time.perf_counter() - started
  return {'mode': 'packed' if packing else 'padded', 'startup_s': startup_s,
          'census': str(report), 'examples_per_s': examples / elapsed,
          'tokens_per_s': tokens / elapsed, 'ms_per_batch': 1e3 * elapsed / _BATCHES.value,
          'pad_fraction': float(np.mean(pad)),
          'batch_time_vs_cpu_step': elapsed / _BATCHES.value / _CPU_STEP_S}


def main(argv):
  del argv
  tokenizer = aj.load_tokenizer('smollm2-135m-instruct')
  results = [measure(tokenizer, packing) for packing in (True, False)]
  load = os.getloadavg()[0]  # other work on the machine slows the loader down
  print(f'SST-2 train, batch {_BATCH_SIZE.value} x {_SEQ_LEN.value}, {_BATCHES.value} batches, '
        f'{os.cpu_count()} CPUs, load average {load:.1f}')
  print(f'{"mode":8} {"startup s":>10} {"examples/s":>11} {"tokens/s":>10} {"ms/batch":>9} '
        f'{"pad":>6} {"batch / CPU step":>17}')
  for r in results:
    print(f'{r["mode"]:8} {r["startup_s"]:10.1f} {r["examples_per_s"]:11.0f} '
          f'{r["tokens_per_s"]:10.0f} {r["ms_per_batch"]:9.2f} {r["pad_fraction"]:6.3f} '
          f'{r["batch_time_vs_cpu_step"]:17.1e}')
  out = os.path.join(os.path.dirname(__file__), 'results', 'data_throughput.json')
  with open(out, 'w') as f:
    json.dump({'source': 'sst2', 'split': 'train', 'batch_size': _BATCH_SIZE.value,
               'seq_len': _SEQ_LEN.value, 'batches': _BATCHES.value, 'cpus': os.cpu_count(),
               'load_average': load,
               'cpu_train_step_s': _CPU_STEP_S, 'results': results}, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
