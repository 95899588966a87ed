"""A short, prepared check of a GPU or TPU: the attention kernels against 'xla', the set-up
probe, train steps by each kernel, then our train step and decoder against their peers.

    .venv/bin/python benchmarks/device_check.py --dry --out=/tmp/device_check.json  # CPU, toy
    python3 benchmarks/device_check.py --out=$OUT/device_check.json                 # the device

The parts, in the order they run (their priority):
  equivalence  each kernel the backend has ('cudnn' and 'pallas' on a GPU, 'splash' and
               'pallas' on a TPU; 'pallas' interpreted with --dry on a CPU) against 'xla' in
               fp32 on the same rounded inputs: the forward and q/k/v gradients on packed rows,
               packed rows of more runs than cuDNN's layout holds, left- and right-padded rows,
               without and with prefix and prompt slots, fp32 and bf16; relative errors
               against kernel_probe.TOLERANCE, and what 'cudnn' handed over to 'pallas'.
  probe        kernel_probe.choose_attention, the trainer's set-up probe, of 'auto' and of each
               kernel at the quickstart's block (SmolLM2-135M: 9 heads, 3 kv heads, head dim
               64, 128 tokens) and Llama-3.2-1B's (32, 8, 64; 1,024 tokens), bf16 without and
               with 20 prompt or prefix slots, and fp32: what runs, and the line it prints.
  train        LoRA on q and v, 20 steps at SmolLM2-135M's shapes (random weights and packed
               rows, 8 × 512, bf16) with each attention, each in a process of its own
               (train_step_sides.OursStep): every step's loss against 'xla''s.
  throughput   our LoRA step (all seven projections) against HF PEFT's on the same random
               Llama-3.2-1B weights, bf16, 8 × 1,024 tokens (train_throughput.py), ours with
               the kernel 'auto' would take were this run's `verified` listed: tokens/s, MFU.
  decode       greedy decode of 64 tokens after 64-token prompts at SmolLM2-135M's shapes
               (random weights, fp32), batch 1 and 64: ours (`generate_ids`) against
               transformers' `generate` on the same device (decode_sides.py), ms/token.
--dry: every part at toy sizes (2 layers, 32-token rows, 3 steps) on a CPU, as the tests run it.

The JSON (--out: the machine, the date, the mode, each part's numbers) is written whole after
every part, to a temporary file then renamed: a run cut off keeps what it did. A part starts
only if the time so far plus its estimate fits --budget_s (the first always starts);
`parts_skipped` names the others, `parts_failed` those that raised (with the traceback's
end); --parts runs a subset. `verified`: for each kernel that ran itself and failed nothing
in the first three parts of a run on a GPU or TPU, its `Checked(...)` entry for
additive_jax/model/verified_kernels.py, the JSON going to benchmarks/results/`result_name`.

The device has jax, flax, optax, orbax, transformers, peft and torch, no network, and gets
the repository's tracked files and named ignored paths. Of what the check imports it lacks
ml-collections (additive_jax.data.config, imported by model.load and train.config): a wheel,
with this package's own (whose metadata gives `additive_jax.__version__`; the code that runs
is the checkout's, first on the path). Here, with the network:

    rm -rf benchmarks/device_wheels
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d benchmarks/device_wheels \
        ml-collections==1.1.0
    .venv/bin/pip wheel -q --no-deps --no-build-isolation -w benchmarks/device_wheels .

On the device, from the repository root, benchmarks/device_wheels carried along:

    python3 -m pip install -q --no-index --no-deps --target=/tmp/device_site \
        benchmarks/device_wheels/*.whl && PYTHONPATH=$PWD:/tmp/device_site \
        python3 benchmarks/device_check.py --out=$OUT/device_check.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import decode_sides  # beside this file, on the path of a script run from here
import machine as machine_lib
import side_process
import train_step_sides
from additive_jax.model import attention, kernel_probe, verified_kernels
from additive_jax.model.config import LlamaConfig

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ('equivalence', 'probe', 'train', 'throughput', 'decode')
LORA_QV = "LoRA(rank=8, alpha=16, targets=('q', 'v'))"
# Largest |loss − xla's| / xla's at any train step: fp32 differs by summation order alone;
# bf16 attention rounds its probabilities and output, and the later steps carry that along.
LOSS_TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2}
# LlamaConfig(V, D, F, L, N, K, H, ...): the shapes, which are all a step's cost depends on
# (Llama-3.2-1B's llama3 rope scaling is left out)
SMOLLM2_135M = LlamaConfig(49152, 576, 1536, 30, 9, 3, 64, rope_theta=1e5, rms_norm_eps=1e-5,
                           tie_word_embeddings=True, max_position_embeddings=8192)
LLAMA_3_2_1B = LlamaConfig(128256, 2048, 8192, 16, 32, 8, 64, rope_theta=5e5, rms_norm_eps=1e-5,
                           tie_word_embeddings=True, max_position_embeddings=131072)
TOY = LlamaConfig(128, 32, 64, 2, 4, 2, 8, max_position_embeddings=256)
DECODE_VARIANTS = {1: 'base', 64: 'base_x64'}  # batch -> its decode_sides.VARIANTS name
PLAIN_BF16 = 'bfloat16, 0 prefix and 0 prompt slots'  # where 'cudnn' must run itself


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the parts' cost depends on."""
  attention: tuple[int, ...]  # equivalence: batch, length, heads, kv heads, head dim
  slots: tuple[int, int]      # equivalence: (prefix, prompt) slots, where there are some
  blocks: dict                # probe: name -> (tokens, heads, kv heads, head dim)
  block_slots: int            # probe: prompt or prefix slots, where there are some
  model: LlamaConfig          # train, decode
  rows: tuple[int, int]       # train: batch, length
  steps: int                  # train
  dtype: str                  # train, throughput
  big_model: LlamaConfig      # throughput
  big_rows: tuple[int, int]   # throughput: batch, length
  timing: tuple[int, ...]     # throughput: warm-up steps, steps a round, rounds
  decode: tuple[int, ...]     # decode: prompt tokens, new tokens, rounds
  estimate_s: tuple[int, ...]  # each part's seconds in PARTS' order (a device's: guessed)


DEVICE = Sizes(attention=(2, 200, 8, 2, 64), slots=(3, 4),
               blocks={'smollm2-135m': (128, 9, 3, 64), 'llama-3.2-1b': (1024, 32, 8, 64)},
               block_slots=20, model=SMOLLM2_135M, rows=(8, 512), steps=20, dtype='bfloat16',
               big_model=LLAMA_3_2_1B, big_rows=(8, 1024), timing=(2, 2, 3), decode=(64, 64, 3),
               estimate_s=(60, 50, 75, 100, 45))
DRY = Sizes(attention=(2, 48, 4, 2, 16), slots=(3, 4), blocks={'toy': (32, 4, 2, 16)},
            block_slots=4, model=TOY, rows=(2, 32), steps=3, dtype='float32', big_model=TOY,
            big_rows=(2, 32), timing=(1, 1, 1), decode=(8, 4, 1), estimate_s=(10, 5, 10, 20, 10))

_DRY = flags.DEFINE_bool('dry', False, 'toy sizes, on a CPU (what the tests run)')
_OUT = flags.DEFINE_string('out', os.path.join(HERE, 'results', 'device_check.json'),
                           'the JSON, written after every part')
_BUDGET_S = flags.DEFINE_float('budget_s', 240, 'start no part that would, by its estimate, end '
                               'later than this many seconds from the start')
_PARTS = flags.DEFINE_list('parts', list(PARTS), f'which of {", ".join(PARTS)}')
flags.register_validator('parts', lambda names: set(names) <= set(PARTS),
                         f'--parts takes some of {", ".join(PARTS)}')

# the set-up probe's inputs, call and measure, over more layouts (private there: one definition)
inputs, relative = kernel_probe.probe_inputs, kernel_probe.relative_error
FORWARD_AND_GRADS = jax.jit(kernel_probe.forward_and_grads, static_argnums=(0, 1))


def segment_layouts(batch: int, length: int) -> dict[str, np.ndarray]:
  """Segment-id rows [batch, length] of each kind (0: padding)."""
  rng = np.random.default_rng(0)

  def packed(pieces):  # runs of random lengths, then 7 slots of padding
    cuts = np.sort(rng.choice(np.arange(8, length - 8), pieces - 1, replace=False))
    ids = np.searchsorted(cuts, np.arange(length), side='right') + 1
    ids[length - 7:] = 0
    return ids

  rows = lambda make: np.stack([make(b) for b in range(batch)]).astype(np.int32)
  return {'packed': rows(lambda b: packed(5)),
          'packed_many_runs': rows(lambda b: packed(5 if b else 24)),  # row 0: > 16 runs
          'left_padded': rows(lambda b: np.arange(length) >= 13 * (b + 1)),
          'right_padded': rows(lambda b: np.arange(length) < length - 17 * b)}


class Check:
  """One run's parts: the sizes, the backend's kernels, a scratch folder."""

  def __init__(self, sizes: Sizes, scratch: str):
    self.sizes, self.scratch, self.checkpoints = sizes, scratch, {}
    self.backend, self.device_kind = jax.default_backend(), jax.devices()[0].device_kind
    self.kernels = verified_kernels.PREFERRED.get(self.backend, ('pallas',))

  def checkpoint(self, config: LlamaConfig) -> str:
    """An HF directory of random weights of `config`'s shapes, written once."""
    if config not in self.checkpoints:
      self.checkpoints[config] = os.path.join(self.scratch, f'base_{len(self.checkpoints)}')
      train_step_sides.write_random_checkpoint(config, self.checkpoints[config])
    return self.checkpoints[config]

  def equivalence(self) -> dict:
    batch, length, heads, kv_heads, head_dim = self.sizes.attention
    cases, handed_over = [], {}
    for num_prefix, num_virtual in [(0, 0), self.sizes.slots]:
      for dtype in ('float32', 'bfloat16'):
        shape = kernel_probe.BlockShape(length, heads, kv_heads, head_dim, dtype, num_prefix,
                                        num_virtual)
        q, k, v, _, cotangent = inputs(shape, rows=batch)
        low = [x.astype(dtype) for x in (q, k, v)]
        exact = [x.astype(jnp.float32) for x in low]  # the same rounded inputs, in fp32
        tolerance = kernel_probe.TOLERANCE[dtype]
        with warnings.catch_warnings(record=True) as caught:  # at tracing: the first layout's
          warnings.simplefilter('always')
          for layout, ids in segment_layouts(batch, num_virtual + length).items():
            want = FORWARD_AND_GRADS('xla', dataclasses.replace(shape, dtype='float32'), *exact,
                                     ids, cotangent)
            for name in self.kernels:
              case = {'kernel': name, 'layout': layout, 'num_prefix': num_prefix,
                      'num_virtual': num_virtual, 'dtype': dtype, 'tolerance_out_grads': tolerance}
              try:
                out, grads = FORWARD_AND_GRADS(name, shape, *low, ids, cotangent)
              except Exception as err:  # pylint: disable=broad-except  # a finding, not the end
                error = f'{type(err).__name__}: {err}'[:500]
                cases.append({**case, 'passed': False, 'error': error})
                continue
              errors = [relative(a, b) for a, b in zip((out, *grads), (want[0], *want[1]))]
              passed = errors[0] <= tolerance[0] and max(errors[1:]) <= tolerance[1]  # NaN: no
              cases.append({**case, 'rel_error_out_dq_dk_dv': errors, 'passed': passed})
        messages = {str(w.message) for w in caught}
        handed_over[f'{dtype}, {num_prefix} prefix and {num_virtual} prompt slots'] = sorted(
            m for m in messages if 'hands over' in m)
    return {'shape': dict(zip(('batch', 'length', 'heads', 'kv_heads', 'head_dim'),
                              self.sizes.attention)),
            'cases': cases, 'handed_over': handed_over,
            'all_passed': all(case['passed'] for case in cases)}

  def probe(self) -> dict:
    rows, slots = [], self.sizes.block_slots
    for block, (tokens, heads, kv_heads, head_dim) in self.sizes.blocks.items():
      for dtype, num_prefix, num_virtual in [('bfloat16', 0, 0), ('bfloat16', 0, slots),
                                             ('bfloat16', slots, 0), ('float32', 0, 0)]:
        shape = kernel_probe.BlockShape(tokens, heads, kv_heads, head_dim, dtype, num_prefix,
                                        num_virtual)
        for requested in ('auto', *self.kernels):
          started = time.perf_counter()
          try:
            runs, line = kernel_probe.choose_attention(requested, shape)
          except attention.KernelUnavailable as err:
            runs, line = None, str(err)
          rows.append({'block': block, 'shape': kernel_probe.describe(shape),
                       'requested': requested, 'runs': runs, 'line': line,
                       'seconds': time.perf_counter() - started})
    return {'auto_resolves_to': attention.resolve('auto'), 'rows': rows}

  def train(self) -> dict:
    batch, length = self.sizes.rows
    setup = {'hf_dir': self.checkpoint(self.sizes.model), 'method': LORA_QV,
             'dtype': self.sizes.dtype, 'warmup': self.sizes.steps,
             'batches': train_step_sides.random_batches(self.sizes.model.vocab_size, batch,
                                                        length, segments=3)}
    # every attention's process at once, their compilations overlapping: so their step
    # times do not compare (the throughput part times steps)
    sides = {name: side_process.Side(name, train_step_sides.serve, 'ours',
                                     {**setup, 'attention': name})
             for name in ('xla', *self.kernels)}
    reports, errors = {}, {}
    try:
      for name, side in sides.items():
        try:
          reports[name] = side.wait_ready()
        except RuntimeError as err:  # a kernel's failure is a finding, not the part's end
          errors[name] = str(err)[-2000:]
    finally:
      for side in sides.values():
        side.close()
    if 'xla' not in reports:
      raise RuntimeError(f"the 'xla' side failed:\n{errors['xla']}")
    want = np.array(reports['xla']['warmup_losses'])
    kernels = {name: {'passed': False, 'error': errors[name]} for name in errors}
    for name in set(self.kernels) - set(errors):
      losses = np.array(reports[name]['warmup_losses'])
      difference = float(np.max(np.abs(losses - want) / np.abs(want)))
      kernels[name] = {'max_rel_loss_difference': difference,  # NaN where a loss is
                       'passed': difference <= LOSS_TOLERANCE[self.sizes.dtype]}
    return {'method': LORA_QV, 'dtype': self.sizes.dtype, 'batch': batch, 'length': length,
            'steps': self.sizes.steps, 'tolerance': LOSS_TOLERANCE[self.sizes.dtype],
            'kernels': kernels, 'losses': {name: r['warmup_losses'] for name, r in reports.items()},
            'compile_s': {name: r['compile_s'] for name, r in reports.items()}}

  def throughput(self, attention_name: str, timeout_s: float) -> dict:
    batch, length = self.sizes.big_rows
    warmup, steps, repeats = self.sizes.timing
    out = os.path.join(self.scratch, 'train_throughput.json')
    command = [sys.executable, os.path.join(HERE, 'train_throughput.py'),
               f'--hf_dir={self.checkpoint(self.sizes.big_model)}', '--data=random',
               '--methods=lora_all', f'--batch={batch}', f'--seq_len={length}',
               f'--warmup={warmup}', f'--steps={steps}', f'--repeats={repeats}',
               f'--dtype={self.sizes.dtype}', f'--attention={attention_name}', f'--out={out}']
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
      raise RuntimeError(f'train_throughput.py exited {done.returncode}:\n{done.stderr[-3000:]}')
    with open(out, encoding='utf-8') as f:
      result = json.load(f)['results'][0]
    ours, theirs = result['ours'], result['theirs']
    peak = ours['peak_flops'] or ours.get('gemm_flops')  # a CPU's: XLA's fp32 GEMM, measured
    return {'attention': attention_name, 'method': ours['method'], 'batch': batch,
            'length': length, 'dtype': ours['dtype'], 'ours_tokens_per_s': ours['tokens_per_s'],
            'theirs_tokens_per_s': theirs['tokens_per_s'],
            'ours_over_theirs': result['speed_ours_over_theirs'],
            'ours_model_tflops_per_s': ours['model_flops_per_s'] / 1e12,
            'ours_mfu': ours['model_flops_per_s'] / peak if peak else None,
            'mfu_against': 'datasheet peak' if ours['peak_flops'] else 'measured fp32 GEMM',
            'step_1_loss_ours_theirs': [ours['warmup_losses'][0], theirs['warmup_losses'][0]],
            'command': ' '.join(command[1:]), 'train_throughput': result}

  def decode(self) -> dict:
    prompt_tokens, new_tokens, rounds = self.sizes.decode
    hf_dir = self.checkpoint(self.sizes.model)
    shape = {'prompt_tokens': prompt_tokens, 'new_tokens': new_tokens}
    sides = {'ours': decode_sides.Side('ours', 'ours', {
                 **shape, 'model': hf_dir, 'variants': list(DECODE_VARIANTS.values())}),
             'theirs': decode_sides.Side('transformers', 'theirs', {
                 **shape, 'hf_dir': hf_dir, 'threads': len(os.sched_getaffinity(0)),
                 'device': 'cuda' if self.backend == 'gpu' else 'cpu',
                 'batches': tuple(DECODE_VARIANTS)})}
    ms = {(side, batch): [] for side in sides for batch in DECODE_VARIANTS}
    try:
      reports = {name: side.wait_ready() for name, side in sides.items()}  # warming up together
      for _ in range(rounds):
        for batch, variant in DECODE_VARIANTS.items():
          for side, args in (('ours', (variant,)), ('theirs', ('theirs', batch))):
            ms[side, batch].append(decode_sides.ms_per_token(sides[side].call('decode', *args)))
    finally:
      for side in sides.values():
        side.close()
    result = {**shape, 'dtype': 'float32', 'rounds': rounds, 'greedy_tokens_agreeing':
              decode_sides.leading_agreement(reports['ours']['first_row_tokens']['base'],
                                             reports['theirs']['first_row_tokens']['theirs'])}
    for batch in DECODE_VARIANTS:
      ours, theirs = (statistics.median(ms[side, batch]) for side in sides)
      result[f'batch_{batch}'] = {'ours_ms_per_token': ours, 'theirs_ms_per_token': theirs,
                                  'theirs_over_ours': theirs / ours,
                                  'each_round': {side: ms[side, batch] for side in sides}}
    return result

  def passing(self, results: dict) -> list[str]:
    """The kernels that failed nothing in the equivalence, probe and train parts (all three
    run), and ran themselves where they can (bf16, no shared slots: 'cudnn' hands anything
    over to 'pallas' under a jax its packed layout was not checked in)."""
    if any(part not in results or 'error' in results[part] for part in PARTS[:3]):
      return []
    handed_over = ' '.join(results['equivalence']['handed_over'].get(PLAIN_BF16, []))
    return [name for name in self.kernels if f"'{name}' hands over" not in handed_over
            and all(c['passed'] for c in results['equivalence']['cases'] if c['kernel'] == name)
            and all(r['runs'] == name for r in results['probe']['rows'] if r['requested'] == name)
            and results['train']['kernels'][name]['passed']]

  def checked(self, kernels: list[str], date: str, result_name: str) -> list:
    """verified_kernels.Checked entries for `kernels`, this jax up to its next minor version."""
    major, minor = verified_kernels.version(jax.__version__)[:2]
    return [verified_kernels.Checked(name, self.backend, self.device_kind, jax.__version__,
                                     f'{major}.{minor + 1}', date, result_name)
            for name in kernels]

  def run(self, part: str, results: dict, date: str, elapsed: float) -> dict:
    if part != 'throughput':
      return getattr(self, part)()
    # ours with the kernel 'auto' would take were this run's entries in the table
    checked = tuple(self.checked(self.passing(results), date, ''))
    name = verified_kernels.auto_kernel(self.backend, self.device_kind, jax.__version__, checked)
    return self.throughput(name, timeout_s=_BUDGET_S.value + 60 - elapsed)


def save(record: dict, path: str, started: float) -> None:
  """The whole record to `path`, through a temporary file renamed over it."""
  record['elapsed_s'] = time.monotonic() - started
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def main(argv):
  del argv
  started = time.monotonic()
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # the sides share the device
  if not _DRY.value and jax.default_backend() == 'cpu':
    raise app.UsageError('on a CPU this check runs only at toy sizes: --dry')
  sizes, date = DRY if _DRY.value else DEVICE, datetime.date.today().isoformat()
  with tempfile.TemporaryDirectory() as scratch:
    check = Check(sizes, scratch)
    kind = ''.join(c if c.isalnum() else '_' for c in check.device_kind.lower())
    record = {
        'mode': 'dry' if _DRY.value else 'device', 'date': date, 'command': ' '.join(sys.argv),
        'machine': {**machine_lib.describe(), 'backend': check.backend,
                    'device_kind': check.device_kind, 'devices': jax.device_count(),
                    'python': sys.version.split()[0]},
        'kernels': list(check.kernels), 'budget_s': _BUDGET_S.value,
        'result_name': f'device_check_{kind}_{date}.json', 'parts_requested': _PARTS.value,
        'parts_done': [], 'parts_skipped': [], 'parts_failed': [], 'results': {}, 'verified': []}
    for part in (p for p in PARTS if p in _PARTS.value):
      elapsed, estimate = time.monotonic() - started, sizes.estimate_s[PARTS.index(part)]
      if record['parts_done'] + record['parts_failed'] and elapsed + estimate > _BUDGET_S.value:
        why = f'{elapsed:.0f} s used + {estimate} s estimated > --budget_s={_BUDGET_S.value:g}'
        record['parts_skipped'].append({'part': part, 'why': why})
        print(f'{part}: skipped ({why})', flush=True)
        continue
      print(f'{part}: running', flush=True)
      try:
        record['results'][part] = check.run(part, record['results'], date, elapsed)
        record['parts_done'].append(part)
      except Exception:  # pylint: disable=broad-except  # recorded; the next parts still run
        record['results'][part] = {'error': traceback.format_exc()[-3000:]}
        record['parts_failed'].append(part)
      record['results'][part]['seconds'] = time.monotonic() - started - elapsed
      print(f'{part}: {"failed" if part in record["parts_failed"] else "done"} in '
            f'{record["results"][part]["seconds"]:.1f} s', flush=True)
      if not _DRY.value:
        record['verified'] = [repr(entry) for entry in check.checked(
            check.passing(record['results']), date, record['result_name'])]
      save(record, _OUT.value, started)
  save(record, _OUT.value, started)  # also where no part ran
  print(f'wrote {_OUT.value}: done {record["parts_done"]}, failed {record["parts_failed"]}, '
        f'skipped {[s["part"] for s in record["parts_skipped"]]}, verified {record["verified"]}')


if __name__ == '__main__':
  app.run(main)
