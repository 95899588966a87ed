"""Greedy decode speed on CPU: our decoder against transformers' `generate`, and each method's cost.

    .venv/bin/python benchmarks/decode.py [--rounds=5] [--new_tokens=128] [--prompt_tokens=64]
        [--methods=pfeiffer,lora,...] [--hf_dir=DIR] [--out=benchmarks/results/decode_cpu.json]
    .venv/bin/python benchmarks/decode.py --write_hf_dir=.bench_hf/smollm2

SmolLM2-135M-Instruct in fp32, batch 1, a `--prompt_tokens` random prompt,
`--new_tokens` greedy tokens with no EOS (all of them generated). Measured, per
decode: the prefill (the call to the first new token) and the decode steps
after it, reported as ms per generated token (the decode loop's time over its
`--new_tokens` − 1 steps; at batch 8, ms per step of 8 tokens). Each side is
warmed up (ours compiled) by one whole decode first; decode_sides.py says where
the timestamps come from.

* ours: `additive_jax.eval.decode.generate_ids` (a jitted prefill, then a
  jitted step per token), without a method, on the base as a user loads it
  (`aj.load_model('smollm2-135m-instruct')`: the GGUF, with no placement of the
  benchmark's own; `--hf_dir` instead names a checkpoint both sides read);
* the generate command as a user types it, after the rounds, in processes of its
  own: `python -m additive_jax.generate --model=... --prompt=... --max_new_tokens=N`
  end to end (start, load, compile, decode, print), and the same with one new
  token; the difference over the tokens it printed is the command's own decode
  rate (`--command_tokens`, `--command_rounds`);
* transformers: `LlamaForCausalLM.generate(do_sample=False, max_new_tokens=N,
  min_new_tokens=N)` with its KV cache, eager torch with as many threads as
  JAX's CPU client (the cores this process may run on), on the same weights:
  both read one HF checkpoint, written once by train_throughput.py's own
  `--write_hf_dir` (under `$ADDITIVE_JAX_CACHE/hf/`, or `--hf_dir`);
* an A/A control: a second process of our base, in the same interleaving; its
  ratio to our base (~1.00) says how large the noise is;
* the memory-read floor: those threads summing (numpy) their share of a
  float32 array the size of the fp32 weights, `FLOOR_READS` times a round. A
  batch-1 decode step reads every weight once, so this is the scale of its
  cost; not a strict bound, as numpy's sum is not the fastest reader (an XLA
  matrix-vector product over the same bytes took ~0.65x its time here), so a
  multiple under 1 can occur. Every ms/token is also given as a multiple of
  the floor's median;
* each method (`--methods`) on our side, with random non-zero trainable values
  (no identity initialization), as a ratio to our base;
* bf16 weights: the base stored in bf16 (half the bytes a step reads), computed
  in fp32 (`param_dtype=bfloat16`, `dtype=float32`), against our fp32 base;
* many adapters: 8 prompts over 8 different stacked LoRA adapters
  (`aj.peft.stack`, `adapter_ids=range(8)`) against the same 8 prompts over one
  (the plain path, no `adapter_ids`).

Our base, theirs and the A/A control run in processes of their own; every
method runs in our base's process. In each of `--rounds` rounds: the floor,
then ours, theirs, ours again (reversed in odd rounds), then each method next to
a run of its reference (our base; for many adapters, one adapter over 8 rows),
the pair's order reversed in odd rounds: with every method, 25 decodes a round.
A ratio is taken within a round, to its reference's run next to it (so that a
drift of the machine's load moves both), and its median over rounds is
reported with its min–max. Writes the settings, the command, versions, the
machine (`machine.py`: the CPU's name, family and model) and every raw timing to
`--out` (after every round).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

import decode_sides  # beside this file, on the path of a script run from here
from decode_sides import leading_agreement, ms_per_token
import machine as machine_lib
from additive_jax import command

# --methods name -> (the variant timed, the variant its ratio is taken to), both in VARIANTS
METHODS = {name: (name, 'base') for name in (
    'pfeiffer', 'houlsby', 'parallel', 'ia3', 'ia3_merged', 'lora', 'lora_merged', 'prompt',
    'prefix', 'ladder')}
METHODS['many_adapters'] = ('lora_x8_stacked', 'lora_x8_one')
METHODS['bf16_weights'] = ('base_bf16_weights', 'base')
FLOOR_READS = 5  # per round
HERE = os.path.dirname(os.path.abspath(__file__))

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'timed decodes per side and method', lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'greedy tokens per decode', lower_bound=2)
_PROMPT_TOKENS = flags.DEFINE_integer('prompt_tokens', 64, 'prompt length', lower_bound=1)
_METHODS = flags.DEFINE_list('methods', list(METHODS), f'of {", ".join(METHODS)}')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'base HF checkpoint directory (default: SmolLM2, '
                              'written once under $ADDITIVE_JAX_CACHE/hf)')
_WRITE_HF_DIR = flags.DEFINE_string('write_hf_dir', None,
                                    'only write SmolLM2-135M-Instruct as an HF checkpoint here')
_OUT = flags.DEFINE_string('out', os.path.join(HERE, 'results', 'decode_cpu.json'),
                           'JSON results')
_COMMAND_TOKENS = flags.DEFINE_integer('command_tokens', 256, 'the generate command: new tokens '
                                       'at most (0: not timed)', lower_bound=0)
_COMMAND_ROUNDS = flags.DEFINE_integer('command_rounds', 2, 'the generate command: runs of each '
                                       'length', lower_bound=1)
COMMAND_PROMPT = 'Once upon a time, in a small town by the sea, there lived'


def write_smollm2(directory: str) -> None:
  """train_throughput.py's writer, in a process of its own: importing that module here would
  define its flags a second time."""
  subprocess.run([sys.executable, os.path.join(HERE, 'train_throughput.py'),
                  f'--write_hf_dir={directory}'], check=True)


def base_checkpoint() -> str:
  if _HF_DIR.value:
    return _HF_DIR.value
  from additive_jax.model import embedded
  directory = os.path.join(embedded.cache_dir(), 'hf', embedded.NAME)  # train_throughput's too
  if not os.path.exists(os.path.join(directory, 'config.json')):  # written last: complete
    write_smollm2(directory)
  return directory


class MemoryFloor:
  """`threads` threads each summing its share of a float32 buffer of `nbytes`."""

  def __init__(self, nbytes: int, threads: int):
    buffer = np.ones(nbytes // 4, np.float32)  # ones, not zeros: every page really mapped
    self.parts = np.array_split(buffer, threads)
    self.pool = concurrent.futures.ThreadPoolExecutor(threads)  # numpy's sum drops the GIL
    self.read_s()  # untimed: the threads started, the pages just written settled

  def read_s(self) -> float:
    started = time.perf_counter()
    list(self.pool.map(np.sum, self.parts))
    return round(time.perf_counter() - started, 6)


def spread(values: list[float]) -> dict:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def run_rounds(sides: dict, floor: MemoryFloor, save) -> dict:
  """The interleaved rounds of the module docstring; `save(raw)` after each."""
  raw = {'floor_s': [], 'base': [], 'theirs': [], 'base_again': [],
         'pairs': {name: [] for name in _METHODS.value}}
  side_of = {'base': ('ours', 'base'), 'theirs': ('theirs', 'theirs'),
             'base_again': ('ours_again', 'base')}
  for round_index in range(_ROUNDS.value):
    forward = round_index % 2 == 0
    raw['floor_s'] += [floor.read_s() for _ in range(FLOOR_READS)]
    for label in list(side_of) if forward else list(side_of)[::-1]:
      side, variant = side_of[label]
      raw[label].append(strip(sides[side].call('decode', variant)))
    for name in _METHODS.value:
      pair = dict(zip(('method', 'reference'), METHODS[name]))
      timed = {role: strip(sides['ours'].call('decode', pair[role]))
               for role in (list(pair) if forward else list(pair)[::-1])}
      raw['pairs'][name].append(timed)
    print(f'round {round_index + 1}/{_ROUNDS.value}: ours {ms_per_token(raw["base"][-1]):.1f}, '
          f'transformers {ms_per_token(raw["theirs"][-1]):.1f}, ours again '
          f'{ms_per_token(raw["base_again"][-1]):.1f} ms/token; floor '
          f'{1000 * min(raw["floor_s"][-FLOOR_READS:]):.1f} ms; load {os.getloadavg()[0]:.1f}',
          flush=True)
    save(raw)
  return raw


def strip(decode: dict) -> dict:
  """A decode's timings, without its tokens (those of the warm-up are kept)."""
  return {'prefill_s': decode['prefill_s'], 'step_s': decode['step_s']}


def summarize(raw: dict) -> list[dict]:
  """One row per thing timed: ms/token (median, min–max over rounds), × the floor, the
  ratio to its reference taken round by round, the median prefill."""
  floor_ms = 1000 * statistics.median(raw['floor_s'])
  floor_row = {'row': f'memory-read floor ({len(raw["floor_s"])} reads)',
               'ms_per_token': spread([1000 * s for s in raw['floor_s']]), 'x_floor': 1.0}

  def row(label, decodes, references=None, reference_label=None):
    ms = [ms_per_token(d) for d in decodes]
    out = {'row': label, 'ms_per_token': spread(ms),
           'x_floor': statistics.median(ms) / floor_ms,
           'prefill_ms': statistics.median(1000 * d['prefill_s'] for d in decodes)}
    if references is not None:
      out['ratio'] = spread([m / ms_per_token(r) for m, r in zip(ms, references)])
      out['reference'] = reference_label
    return out

  rows = [floor_row, row('ours, base', raw['base']),
          row('transformers generate', raw['theirs'], raw['base'], 'ours, base (same round)'),
          row('ours, base again (A/A)', raw['base_again'], raw['base'], 'ours, base (same round)')]
  for name, pairs in raw['pairs'].items():
    variant, reference = (decode_sides.VARIANTS[v] for v in METHODS[name])
    if name == 'many_adapters':
      rows.append(row(f'8 rows, one adapter: `{reference.method}` (ms/step)',
                      [p['reference'] for p in pairs]))
      rows.append(row('8 rows, 8 different adapters stacked (ms/step)',
                      [p['method'] for p in pairs], [p['reference'] for p in pairs],
                      '8 rows, one adapter (next run)'))
    else:
      label = f'{name}: `{variant.method}`' + (' merged' if variant.merged else '')
      rows.append(row(label, [p['method'] for p in pairs], [p['reference'] for p in pairs],
                      'ours, base (next run)'))
  return rows


def table(rows: list[dict]) -> str:
  lines = ['| what | ms/token median | min–max | × floor | ÷ reference: median (min–max) '
           '| reference | prefill ms |', '|---|---|---|---|---|---|---|']
  for r in rows:
    ms = r['ms_per_token']
    ratio = (f'{r["ratio"]["median"]:.2f} ({r["ratio"]["min"]:.2f}–{r["ratio"]["max"]:.2f})'
             if 'ratio' in r else '—')
    prefill = f'{r["prefill_ms"]:.0f}' if 'prefill_ms' in r else '—'
    lines.append(f'| {r["row"]} | {ms["median"]:.1f} | {ms["min"]:.1f}–{ms["max"]:.1f} | '
                 f'{r["x_floor"]:.2f} | {ratio} | {r.get("reference", "—")} | {prefill} |')
  return '\n'.join(lines)


def command_timing(model: str) -> dict:
  """The generate command, end to end: the wall time of one new token and of
  `--command_tokens`, interleaved, and the decode rate between them."""
  from additive_jax.model.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(model)

  def run(new_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, '-m', 'additive_jax.generate', f'--model={model}',
                          f'--prompt={COMMAND_PROMPT}', f'--max_new_tokens={new_tokens}'],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    return wall, len(tokenizer(out.stdout.rstrip('\n'), add_special_tokens=False)['input_ids'])

  short, long = [], []
  for _ in range(_COMMAND_ROUNDS.value):
    short.append(run(1))
    long.append(run(_COMMAND_TOKENS.value))
  one_s = statistics.median(w for w, _ in short)
  many_s, tokens = statistics.median(w for w, _ in long), long[0][1]
  return {'prompt': COMMAND_PROMPT, 'max_new_tokens': _COMMAND_TOKENS.value,
          'tokens_printed': tokens, 'wall_s_one_token': one_s, 'wall_s': many_s,
          'runs': {'one_token': short, 'long': long},
          'ms_per_token': 1000 * (many_s - one_s) / max(tokens - 1, 1),
          'tokens_per_s_end_to_end': tokens / many_s}


def main(argv):
  del argv
  if _WRITE_HF_DIR.value:
    write_smollm2(_WRITE_HF_DIR.value)
    return
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown:
    raise app.UsageError(f'unknown methods {unknown}; known: {", ".join(METHODS)}')
  load_before = os.getloadavg()
  hf_dir = base_checkpoint()
  model = _HF_DIR.value or 'smollm2-135m-instruct'  # ours: as a user names it
  threads = len(os.sched_getaffinity(0))  # JAX's CPU client uses every core it may run on
  shape = {'prompt_tokens': _PROMPT_TOKENS.value, 'new_tokens': _NEW_TOKENS.value}
  ours = {**shape, 'model': model}
  variants = ['base'] + sorted({v for m in _METHODS.value for v in METHODS[m]} - {'base'})
  sides = {'ours': decode_sides.Side('ours', 'ours', {**ours, 'variants': variants}),
           'theirs': decode_sides.Side('transformers', 'theirs',
                                       {**shape, 'hf_dir': hf_dir, 'threads': threads}),
           'ours_again': decode_sides.Side('ours again', 'ours', {**ours, 'variants': ['base']})}
  try:
    reports = {name: side.wait_ready() for name, side in sides.items()}  # warming up together
    floor = MemoryFloor(reports['ours']['base_bytes'], threads)
    record = {
        'settings': {**shape, 'model': model, 'hf_dir': hf_dir, 'rounds': _ROUNDS.value,
                     'methods': _METHODS.value,
                     'threads': threads, 'floor_reads_per_round': FLOOR_READS,
                     'variants': {v: vars(decode_sides.VARIANTS[v]) for v in variants}},
        'command': ' '.join(sys.argv),
        'versions': {**reports['ours']['versions'], **reports['theirs']['versions'],
                     'numpy': np.__version__},
        'machine': {**machine_lib.cpu(), 'load_average_before': load_before},
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'sides': reports}

    def save(raw):
      record['machine']['load_average_after'] = os.getloadavg()
      record['raw'] = raw
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      text = json.dumps(record, indent=1)
      # a list of numbers (each decode's step times, tokens) on one line, not one per line
      text = re.sub(r'\[[-+\d.e,\s]*\]', lambda m: ' '.join(m.group(0).split()), text)
      with open(_OUT.value, 'w', encoding='utf-8') as f:
        f.write(text)

    raw = run_rounds(sides, floor, save)
  finally:
    for side in sides.values():
      side.close()
  if _COMMAND_TOKENS.value:  # the sides closed: the command has the machine to itself
    record['generate_command'] = command_timing(model)
  record['rows'] = summarize(raw)
  ours_tokens = reports['ours']['first_row_tokens']['base']
  record['greedy_tokens_agreeing'] = leading_agreement(
      ours_tokens, reports['theirs']['first_row_tokens']['theirs'])
  save(raw)
  print(machine_lib.caption({**record['machine'], 'versions': record['versions']}))
  print(f'{reports["ours"]["device"]}, fp32, batch 1, {_PROMPT_TOKENS.value}-token prompt, '
        f'{_NEW_TOKENS.value} new tokens, {_ROUNDS.value} rounds, {threads} threads, weights '
        f'{reports["ours"]["base_bytes"] / 1e6:.0f} MB, load average {load_before[0]:.1f} -> '
        f'{os.getloadavg()[0]:.1f}')
  print(table(record['rows']))
  if 'generate_command' in record:
    timed = record['generate_command']
    print(f'the generate command: {timed["tokens_printed"]} tokens in {timed["wall_s"]:.1f} s '
          f'end to end ({timed["wall_s_one_token"]:.1f} s for one token): '
          f'{timed["ms_per_token"]:.1f} ms a token')
  print(f'greedy tokens: ours and transformers agree on the first '
        f'{record["greedy_tokens_agreeing"]} of {len(ours_tokens)}')
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  command.run(main)
