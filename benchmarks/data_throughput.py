"""Throughput of the data loader on SST-2 train, packed and padded, next to the train step it feeds.

    .venv/bin/python benchmarks/data_throughput.py [--batches=200] [--batch_size=8] [--seq_len=256]
        [--steps=3]

For each mode: the start-up time (TFDS preparation if needed, and the length
census), then examples/s and real (non-padding) tokens/s over `--batches`
batches after the first, and the pad fraction. Then it measures the train step
those batches feed, at the same shape: the trainer's own step (`create_train_state`
and `jit_train_step`, as train_step_sides.OursStep builds it) of the quickstart's
method, a Pfeiffer adapter of dim 64, on the embedded SmolLM2-135M-Instruct in
fp32, one warm-up step and `--steps` timed steps on the loader's first packed
batches; and gives one batch's load time as a fraction of the median step (the
best step is in the JSON too). It writes the table, the step's times, the machine's
CPU and the load average as JSON to benchmarks/results/data_throughput.json.
"""

import json
import os
import statistics
import time

from absl import app, flags
import jax
import numpy as np

import additive_jax as aj
from additive_jax.data.config import data_config
from additive_jax.data.packing import pad_fraction
from additive_jax.data.pipeline import make_train_iterator

import machine as machine_lib  # beside this file, on the path of a script run from here
import train_step_sides

_BATCHES = flags.DEFINE_integer('batches', 200, 'batches timed after the first')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'rows per batch')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'positions per row')
_STEPS = flags.DEFINE_integer('steps', 3, 'train steps timed after one warm-up step', lower_bound=1)

MODEL = 'smollm2-135m-instruct'
METHOD = "Bottleneck(dim=64, placement='pfeiffer')"  # the quickstart's (configs/sst2.py)


def examples_in(batch) -> int:
  """Packed segments, or padded rows, of a batch (segment ids are 1, 2, ... within a row)."""
  return int(batch['segment_ids'].max(axis=1).sum())


def measure(tokenizer, packing: bool, keep: int = 0) -> tuple[dict, list]:
  """The loader's figures in one mode, and its first `keep` batches."""
  config = data_config()
  config.packing = packing
  started = time.perf_counter()
  iterator, report = make_train_iterator(config, tokenizer, batch_size=_BATCH_SIZE.value,
                                         seq_len=_SEQ_LEN.value, seed=0)
  kept = [next(iterator)]  # the first batch waits for the reader thread to start
  startup_s = time.perf_counter() - started
  examples = tokens = 0
  pad = []
  started = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
    examples += examples_in(batch)
    tokens += int((batch['segment_ids'] > 0).sum())
    pad.append(pad_fraction(batch))
    if len(kept) < keep:
      kept.append(batch)
  elapsed = time.perf_counter() - started
  return {'mode': 'packed' if packing else 'padded', 'startup_s': startup_s,
          'census': str(report), 'examples_per_s': examples / elapsed,
          'tokens_per_s': tokens / elapsed, 'ms_per_batch': 1e3 * elapsed / _BATCHES.value,
          'pad_fraction': float(np.mean(pad))}, kept[:keep]


def train_step(batches: list) -> dict:
  """The trainer's step on these batches: one warm-up step, then `--steps` timed ones."""
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
  step = train_step_sides.OursStep(MODEL, METHOD, batches, dtype='float32', warmup=1)
  seconds = step.time_steps(_STEPS.value)
  return {'model': MODEL, 'method': step.report['method'], 'dtype': 'float32',
          'batch_size': _BATCH_SIZE.value, 'seq_len': _SEQ_LEN.value,
          'loss_positions_budget': step.report['loss_positions_budget'],
          'compile_s': step.report['compile_s'], 'warmup_step_s': step.report['warmup_step_s'],
          'step_s': seconds, 'median_step_s': statistics.median(seconds),
          'best_step_s': min(seconds)}


def main(argv):
  del argv
  load_before = os.getloadavg()[0]  # other work on the machine slows both down
  tokenizer = aj.load_tokenizer(MODEL)
  packed, batches = measure(tokenizer, True, keep=_STEPS.value)
  padded, _ = measure(tokenizer, False)
  step = train_step(batches)
  results = [packed, padded]
  for r in results:
    r['batch_time_vs_train_step'] = r['ms_per_batch'] / 1e3 / step['median_step_s']
  machine = {**machine_lib.cpu(), 'load_average_before': load_before,
             'load_average_after': os.getloadavg()[0]}
  print(f'SST-2 train, batch {_BATCH_SIZE.value} x {_SEQ_LEN.value}, {_BATCHES.value} batches; '
        f'{machine["model_name"]} (family {machine["family"]}, model {machine["model"]}), '
        f'{machine["cores"]} cores, load average {load_before:.1f} -> '
        f'{machine["load_average_after"]:.1f}')
  print(f'train step ({METHOD}, fp32): median {step["median_step_s"]:.2f} s, best '
        f'{step["best_step_s"]:.2f} s, of '
        + ', '.join(f'{s:.2f}' for s in step['step_s']))
  print(f'{"mode":8} {"startup s":>10} {"examples/s":>11} {"tokens/s":>10} {"ms/batch":>9} '
        f'{"pad":>6} {"batch / train step":>19}')
  for r in results:
    print(f'{r["mode"]:8} {r["startup_s"]:10.1f} {r["examples_per_s"]:11.0f} '
          f'{r["tokens_per_s"]:10.0f} {r["ms_per_batch"]:9.2f} {r["pad_fraction"]:6.3f} '
          f'{r["batch_time_vs_train_step"]:19.1e}')
  out = os.path.join(os.path.dirname(__file__), 'results', 'data_throughput.json')
  with open(out, 'w') as f:
    json.dump({'source': 'sst2', 'split': 'train', 'batch_size': _BATCH_SIZE.value,
               'seq_len': _SEQ_LEN.value, 'batches': _BATCHES.value, 'machine': machine,
               'versions': {'jax': jax.__version__, 'additive_jax': aj.__version__},
               'train_step': step, 'results': results}, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
