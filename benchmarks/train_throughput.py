"""Train-step throughput and memory: additive_jax against Hugging Face PEFT (torch), side by side.

    .venv/bin/python benchmarks/train_throughput.py [--methods=lora_qv,ia3] [--batch=4]
        [--seq_len=128] [--steps=1] [--repeats=5] [--warmup=2] [--dtype=auto] [--attention=auto]
        [--hf_dir=DIR [--random_weights]] [--out=benchmarks/results/train_throughput_cpu.json]
    .venv/bin/python benchmarks/train_throughput.py --write_hf_dir=.bench_hf/smollm2

Both sides train the same base (SmolLM2-135M-Instruct, written once as an HF
checkpoint with `params_to_hf`/`config_to_hf` under `$ADDITIVE_JAX_CACHE/hf/`,
or `--hf_dir`), on the same batches (`--data=sst2`: the quickstart's first
`--num_batches` batches of `--batch` packed rows of `--seq_len` tokens from the
real data pipeline, loss on the label words and EOS alone; `--data=gsm8k`: GSM8K
rows in SmolLM2's chat template, loss on the answers; `--data=random`: random
tokens, every target counted), with the same method and starting adapter values (ours
exports its initial adapter to HF PEFT's format and PEFT loads it), the same
trainable set and AdamW (constant learning rate, no weight decay, global-norm
clipping at 1.0), and the same precision: fp32 on CPU; on an accelerator
(`--dtype=auto`) bf16 compute over fp32 weights, trainables and Adam state
(ours: `LlamaConfig.dtype=bfloat16`; theirs: `torch.autocast(bfloat16)` over the
fp32 model). torch runs eagerly (no `torch.compile`) with as many CPU threads as
JAX's CPU client uses (every core this process may run on).

Each side runs in a process of its own (train_step_sides.py), is warmed up
(ours compiled ahead of time) and then timed in `--repeats` rounds of `--steps`
synchronized optimizer steps (forward, backward, clipping, update), the rounds
of ours and theirs interleaved, alternating which goes first. Reported:
tokens/s from the median step time, the ratio ours/theirs, and memory:
  CPU  bytes of buffers alive at the step's peak: ours from XLA's buffer
       assignment of the compiled step (arguments + outputs − donated aliases +
       temporaries); theirs from torch's profiler (tensors alive before a step +
       the largest rise of its allocation timeline during one);
  GPU  each process's allocator peak over loading, warm-up and timing: JAX's
       `peak_bytes_in_use`; torch's `max_memory_allocated()`.
Both include the fp32 base weights. Bottleneck adapters and ladder side tuning
run on our side alone (HF PEFT has neither). Writes the table as JSON to `--out`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

import machine as machine_lib  # beside this file, on the path of a script run from here
import side_process
import train_step_sides
from additive_jax.model.config import ATTENTION_IMPLEMENTATIONS

LORA_ALL = "('q', 'k', 'v', 'o', 'gate', 'up', 'down')"
# name -> (our method, why HF PEFT has no counterpart or None)
METHODS = {
    'lora_qv': ("LoRA(rank=8, alpha=16, targets=('q', 'v'))", None),
    'lora_all': (f'LoRA(rank=8, alpha=16, targets={LORA_ALL})', None),
    'ia3': ('IA3()', None),
    'prompt': ('PromptTuning(num_tokens=20)', None),
    'prefix': ('PrefixTuning(num_tokens=20)', None),
    'bottleneck': ("Bottleneck(dim=64, placement='pfeiffer')",
                   'HF PEFT has no bottleneck adapter; AdapterHub (adapters 1.3.0) pins '
                   'transformers 4.57 and is not installable in this venv'),
    'ladder': ('LadderSide(reduction=8)', 'neither HF PEFT nor AdapterHub has ladder side tuning'),
}

SUPERSCRIPTS = '¹²³⁴⁵⁶⁷'

_METHODS = flags.DEFINE_list('methods', list(METHODS), f'of {", ".join(METHODS)}')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per step', lower_bound=1)
_DATA = flags.DEFINE_enum('data', 'sst2', ['sst2', 'gsm8k', 'random'],
                          'the batches: packed rows of a real split, or random tokens')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 4, 'distinct batches the timed steps cycle '
                                    'through', lower_bound=1)
_GEMM_CHECK = flags.DEFINE_bool('gemm_peak', True, 'on a CPU, measure an fp32 XLA matrix '
                                "product's FLOP/s, the figure CPU MFU is taken against")
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'tokens per row', lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 1, 'timed steps per round', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'rounds per side, interleaved with the other side',
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps per side before the rounds',
                               lower_bound=1)
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                           'compute dtype; auto: float32 on CPU, bfloat16 on an accelerator')
_ATTENTION = flags.DEFINE_enum('attention', 'auto', list(ATTENTION_IMPLEMENTATIONS),
                               "ours: the model's attention (additive_jax/model/attention.py)")
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'base HF checkpoint directory (default: SmolLM2, '
                              'written once under $ADDITIVE_JAX_CACHE/hf)')
_RANDOM_WEIGHTS = flags.DEFINE_bool(
    'random_weights', False, "with --hf_dir: read only its config.json and draw the weights "
    '(seeded) into a temporary checkpoint; speed and memory do not depend on their values')
_WRITE_HF_DIR = flags.DEFINE_string('write_hf_dir', None,
                                    'only write SmolLM2-135M-Instruct as an HF checkpoint here')
_OUT = flags.DEFINE_string('out', None, 'JSON results (default: '
                           'benchmarks/results/train_throughput_<cpu|gpu>.json)')


def write_smollm2(directory: str) -> None:
  """The embedded SmolLM2-135M-Instruct, fp32, as an HF checkpoint."""
  import additive_jax as aj
  from additive_jax.model import embedded
  from additive_jax.model.convert import params_to_hf

  config, params = aj.load_model(embedded.NAME)
  train_step_sides.write_hf_checkpoint(directory, config, params_to_hf(config, params))


def base_checkpoint(scratch: str) -> str:
  """The HF directory both sides read (written under `scratch` for --random_weights)."""
  if _RANDOM_WEIGHTS.value:
    if not _HF_DIR.value:
      raise app.UsageError('--random_weights takes the shapes from --hf_dir/config.json')
    from additive_jax.model.load import load_config
    config = load_config(os.path.join(_HF_DIR.value, 'config.json'))
    train_step_sides.write_random_checkpoint(config, os.path.join(scratch, 'base'))
    return os.path.join(scratch, 'base')
  if _HF_DIR.value:
    return _HF_DIR.value
  from additive_jax.model import embedded
  directory = os.path.join(embedded.cache_dir(), 'hf', embedded.NAME)
  if not os.path.exists(os.path.join(directory, 'config.json')):
    write_smollm2(directory)
  return directory


def start_side(name: str, setup: dict) -> side_process.Side:
  """One side (train_step_sides.serve), warmed up: its report is in `.report`."""
  side = side_process.Side(name, train_step_sides.serve, name, setup)
  try:
    side.wait_ready()
  except BaseException:
    side.close()
    raise
  return side


def real_batches(data: str, batch: int, seq_len: int, count: int) -> list[dict]:
  """The first `count` batches of the train split as the trainer reads them (seed 0)."""
  import numpy as np
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import gsm8k, sst2  # the repository's experiment configs
  from additive_jax.data.pipeline import make_train_iterator
  from additive_jax.model.tokenizer import load_tokenizer

  config = (sst2 if data == 'sst2' else gsm8k).get_config()
  iterator, _ = make_train_iterator(config.data, load_tokenizer(config.model), batch_size=batch,
                                    seq_len=seq_len, seed=0)
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(count)]


def cpu_gemm_flops() -> float:
  """fp32 FLOP/s of XLA's [1024, 576] × [576, 1536] product (SmolLM2's MLP), median of 20."""
  import jax
  import jax.numpy as jnp
  cpu = jax.devices('cpu')[0]
  x, y = jax.device_put(jnp.ones((1024, 576)), cpu), jax.device_put(jnp.ones((576, 1536)), cpu)
  product = jax.jit(jnp.matmul)
  product(x, y).block_until_ready()
  seconds = []
  for _ in range(20):
    started = time.perf_counter()
    product(x, y).block_until_ready()
    seconds.append(time.perf_counter() - started)
  return 2 * 1024 * 576 * 1536 / statistics.median(seconds)


def measure_method(name: str, hf_dir: str, batches: list | None) -> dict:
  """Warms up ours (and theirs, if PEFT has the method), then times interleaved rounds."""
  method, theirs_missing = METHODS[name]
  setup = {'hf_dir': hf_dir, 'batches': batches, 'dtype': _DTYPE.value, 'warmup': _WARMUP.value}
  with tempfile.TemporaryDirectory() as adapter_dir:
    sides = [start_side('ours', {**setup, 'method': method, 'attention': _ATTENTION.value,
                                 'adapter_dir': None if theirs_missing else adapter_dir})]
    try:
      ours = sides[0].report
      if not theirs_missing:
        sides.append(start_side('theirs', {
            **setup, 'dtype': ours['dtype'], 'adapter_dir': adapter_dir,
            'device': 'cpu' if ours['platform'] == 'cpu' else 'cuda',
            'threads': len(os.sched_getaffinity(0)), 'learning_rate': ours['learning_rate']}))
      seconds = {side.label: [] for side in sides}
      for repeat in range(_REPEATS.value):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
          seconds[side.label] += side.call('time_steps', _STEPS.value)
      finals = {side.label: side.call('finish') for side in sides}
    finally:
      for side in sides:
        side.close()
  tokens = _BATCH.value * _SEQ_LEN.value
  result = {'name': name, 'theirs_missing': theirs_missing}
  for side in sides:
    report = {**side.report, **finals[side.label], 'step_s': seconds[side.label]}
    report['median_step_s'] = statistics.median(seconds[side.label])
    report['best_step_s'] = min(seconds[side.label])
    report['tokens_per_s'] = tokens / report['median_step_s']
    if side.label == 'ours':
      report['model_flops_per_s'] = report['step_flops'] / report['median_step_s']
    report['memory_bytes'] = memory_bytes(side.label, report, ours['platform'] == 'cpu')
    result[side.label] = report
  if not theirs_missing:
    result['speed_ours_over_theirs'] = (result['ours']['tokens_per_s']
                                        / result['theirs']['tokens_per_s'])
    result['speed_ours_over_theirs_best'] = (result['theirs']['best_step_s']
                                             / result['ours']['best_step_s'])
    result['memory_ours_over_theirs'] = (result['ours']['memory_bytes']
                                         / result['theirs']['memory_bytes'])
  return result


def memory_bytes(side: str, report: dict, on_cpu: bool) -> int:
  """The memory figure of the module docstring for this side and platform."""
  if side == 'ours':
    return report['compiled_step_bytes']['total'] if on_cpu else report['peak_bytes_in_use']
  return report['profiled_step_bytes']['total'] if on_cpu else report['max_memory_allocated']


def progress(result: dict) -> str:
  """One line per method: each side's tokens/s, warm-up and timed step seconds."""
  seconds = lambda xs: ' '.join(f'{x:.2f}' for x in xs)
  sides = [f'{side} {result[side]["tokens_per_s"]:,.0f} tokens/s (warm-up s: '
           f'{seconds(result[side]["warmup_step_s"])}; timed: {seconds(result[side]["step_s"])})'
           for side in ('ours', 'theirs') if side in result]
  return f'{result["name"]}: ' + ', '.join(sides)


def table(results: list[dict]) -> str:
  """A markdown table, one row per method; why a method has no HF PEFT side is a footnote."""
  mib = lambda n: f'{n / 2**20:,.0f}'
  lines = ['| method | trainable params | tokens/s ours | tokens/s HF PEFT | speed ours/PEFT: '
           'median (best step) | memory MiB ours | memory MiB HF PEFT | memory ours/PEFT '
           '| step-1 loss ours / PEFT | model TFLOP/s ours | MFU ours |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  footnotes = []
  for r in results:
    ours, theirs = r['ours'], r.get('theirs')
    peak = ours['peak_flops'] or ours.get('gemm_flops')
    mfu = f'{ours["model_flops_per_s"] / peak:.1%}' if peak else '—'
    cells = [f'{r["name"]}: `{METHODS[r["name"]][0]}`', f'{ours["trainable_params"]:,}',
             f'{ours["tokens_per_s"]:,.0f}']
    if theirs:
      cells += [f'{theirs["tokens_per_s"]:,.0f}',
                f'{r["speed_ours_over_theirs"]:.2f} ({r["speed_ours_over_theirs_best"]:.2f})',
                mib(ours['memory_bytes']), mib(theirs['memory_bytes']),
                f'{r["memory_ours_over_theirs"]:.2f}',
                f'{ours["warmup_losses"][0]:.5f} / {theirs["warmup_losses"][0]:.5f}']
      if theirs['trainable_params'] != ours['trainable_params']:
        cells[1] += f' (PEFT: {theirs["trainable_params"]:,})'
    else:
      mark = SUPERSCRIPTS[len(footnotes)]
      cells += [f'—{mark}', '—', mib(ours['memory_bytes']), '—', '—',
                f'{ours["warmup_losses"][0]:.5f} / —']
      footnotes.append(f'{mark} {r["name"]}: {r["theirs_missing"]}.')
    cells += [f'{ours["model_flops_per_s"] / 1e12:.3f}', mfu]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [''] + footnotes if footnotes else []
  return '\n'.join(lines)


def main(argv):
  del argv
  if _WRITE_HF_DIR.value:
    write_smollm2(_WRITE_HF_DIR.value)
    print(f'wrote {_WRITE_HF_DIR.value}')
    return
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown:
    raise app.UsageError(f'unknown methods {unknown}; known: {", ".join(METHODS)}')
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave torch its GPU memory
  load_before = os.getloadavg()[0]
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    hf_dir = base_checkpoint(scratch)
    if _DATA.value == 'random':
      from additive_jax.model.load import load_config
      vocab_size = load_config(os.path.join(hf_dir, 'config.json')).vocab_size
      batches = train_step_sides.random_batches(vocab_size, _BATCH.value, _SEQ_LEN.value)
    else:
      batches = real_batches(_DATA.value, _BATCH.value, _SEQ_LEN.value, _NUM_BATCHES.value)
    gemm = cpu_gemm_flops() if _GEMM_CHECK.value and not _DTYPE.value == 'bfloat16' else None
    for name in _METHODS.value:
      results.append(measure_method(name, hf_dir, batches))
      if results[-1]['ours']['platform'] == 'cpu':
        results[-1]['ours']['gemm_flops'] = gemm
      print(progress(results[-1]), flush=True)
      out = save(results, load_before)  # after every method: a cut-short run keeps its rows
  print(machine_lib.caption(machine_lib.describe()))
  print(f'{results[0]["ours"]["device"]}, {results[0]["ours"]["dtype"]}, batch {_BATCH.value} x '
        f'{_SEQ_LEN.value} tokens, {_REPEATS.value} x {_STEPS.value} timed steps a side, '
        f'{len(os.sched_getaffinity(0))} CPU threads, load average {load_before:.1f} -> '
        f'{os.getloadavg()[0]:.1f}')
  print(table(results))
  print(f'wrote {out}')


def save(results: list[dict], load_before: float) -> str:
  """Writes the settings and the rows so far to --out (default: by platform); prints nothing."""
  first = results[0]['ours']
  settings = {'hf_dir': _HF_DIR.value, 'random_weights': _RANDOM_WEIGHTS.value,
              'batch': _BATCH.value, 'seq_len': _SEQ_LEN.value, 'steps': _STEPS.value,
              'data': _DATA.value, 'num_batches': _NUM_BATCHES.value,
              'attention': _ATTENTION.value,
              'loss_fraction': first['loss_fraction'], 'date': time.strftime('%Y-%m-%d'),
              'repeats': _REPEATS.value, 'warmup': _WARMUP.value, 'dtype': first['dtype'],
              'device': first['device'], 'cpu_threads': len(os.sched_getaffinity(0)),
              'load_average': [load_before, os.getloadavg()[0]]}
  platform = 'cpu' if first['platform'] == 'cpu' else 'gpu'
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                   f'train_throughput_{platform}.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w', encoding='utf-8') as f:
    json.dump({'settings': settings, 'command': ' '.join(sys.argv),
               'machine': machine_lib.describe(), 'results': results}, f, indent=2)
  return out


if __name__ == '__main__':
  app.run(main)
