"""A base in blocks (`base_quant`): its bytes, train and decode speed, and what XLA does with it.

    .venv/bin/python benchmarks/quant.py [--rounds=5] [--modes=none,int8,int4,nf4,gguf]
        [--shapes=smollm2,llama-3.2-1b,llama-3.1-8b] [--parts=memory,speed]
        [--out=benchmarks/results/quant_{part}_cpu.json]

Three parts, all in this process, on the CPU (one device):

* memory plan: for each model shape and mode, the compiled train step's own accounting
  (`compiled.memory_analysis()`, train/step_memory.py) of a LoRA run (r 8 on all seven
  projections, QLoRA's setting) at batch 1 × 512 tokens: the base's bytes (the params
  argument), the step's arguments, temporaries and its total. Compiled from shapes alone
  (`jax.ShapeDtypeStruct`), so Llama-3.2-1B's and Llama-3.1-8B's need no weights and no memory;
  SmolLM2's `gguf` layout is read from the embedded file's tensor types.
* speed on SmolLM2-135M-Instruct, each mode's base loaded as a user loads it
  (`aj.load_model('smollm2-135m-instruct', quant=mode)`): train tokens/s of that LoRA at the
  quickstart's batch (8 rows × 128 tokens, random tokens), and batch-1 greedy decoding
  (`generate_ids`, a 64-token prompt): ms/token = (time for N + 1 new tokens − time for 1) / N.
  Every round times every mode once, in an order that alternates; medians over the rounds.
* the decode step's optimized HLO for each mode: whether XLA:CPU fuses the widening into
  the product (a fusion holding a `dot` that reads the 8- or 4-bit codes) or widens each
  weight into a buffer of its own first (a fusion of the codes whose f32 output a `dot`
  reads), counted over the step's dots; and the step's temporary bytes.

Writes the machine (machine.py), the settings and every raw timing to `--out`, a file a part.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import machine as machine_lib  # beside this file, on the path of a script run from here
import additive_jax as aj
from additive_jax import command
from additive_jax.eval.decode import generate_ids
from additive_jax.model.config import LlamaConfig
from additive_jax.model.gguf_checkpoint import open_gguf, tensor_types
from additive_jax.model.llama import Llama, abstract_variables
from additive_jax.model import embedded
from additive_jax.model.load import load_config, resolve
from additive_jax.model.quant_layout import abstract_quantized, layout_for
from additive_jax.train.mesh import make_mesh, replicated
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.step import TrainState, jit_train_step
from additive_jax.train.step_memory import compiled_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ('none', 'int8', 'int4', 'nf4', 'gguf')
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                    num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_theta=500000.0)
LLAMA_3_1_8B = dict(LLAMA_3_2_1B, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    head_dim=128, tie_word_embeddings=False)
SHAPES = {'smollm2': None, 'llama-3.2-1b': LLAMA_3_2_1B, 'llama-3.1-8b': LLAMA_3_1_8B}
LORA = aj.peft.LoRA(rank=8, alpha=16, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'timed rounds, every mode once a round', lower_bound=1)
_MODES = flags.DEFINE_list('modes', list(MODES), f'of {", ".join(MODES)}')
_SHAPES = flags.DEFINE_list('shapes', list(SHAPES), f'memory plans of {", ".join(SHAPES)}')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'decode: greedy tokens timed', lower_bound=1)
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 3, 'train steps timed a round', lower_bound=1)
_PARTS = flags.DEFINE_list('parts', ['memory', 'speed'], 'memory (plans compiled from shapes: '
                           'no timing) and speed (timings and the HLO), in one JSON each')
_OUT = flags.DEFINE_string('out', os.path.join(HERE, 'results', 'quant_{part}_cpu.json'),
                           'JSON results, {part} the part')


def abstract_params(config: LlamaConfig, mode: str, gguf_types=None):
  layout = layout_for(config, mode, 0, gguf_types)
  boxed = abstract_quantized(abstract_variables(config)['params'], layout)
  return jax.tree.map(lambda box: box.value, boxed, is_leaf=lambda x: hasattr(x, 'names'))


def compiled_step(config: LlamaConfig, params, batch: int, seq_len: int):
  """The LoRA train step compiled for one device from `params` (arrays or shapes)."""
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = Llama(config, peft=(LORA,))
  optimizer = make_optimizer(['lora'], {'lora': method_settings(type(LORA))}, 100)
  state = jax.eval_shape(lambda p: TrainState.create(
      model.init_peft(jax.random.key(0), p)['peft'], optimizer), params)
  shardings = jax.tree.map(lambda _: replicated(mesh), state)
  param_shardings = jax.tree.map(lambda _: replicated(mesh), params)
  step = jit_train_step(model, optimizer, 1, mesh, (), shardings, param_shardings)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  abstract_batch = {'tokens': tokens, 'targets': tokens, 'positions': tokens, 'segment_ids': tokens,
                    'loss_mask': jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}
  return step, state, step.lower(state, params, abstract_batch).compile()


def memory_plans() -> dict:
  plans = {}
  for shape in _SHAPES.value:
    if SHAPES[shape] is None:
      config = load_config(embedded.NAME)
      types = tensor_types(open_gguf(resolve(embedded.NAME)), config)
    else:
      config, types = LlamaConfig(**SHAPES[shape]), None
    for mode in [m for m in _MODES.value if m != 'gguf' or types is not None]:
      params = abstract_params(config, mode, types)
      analysis = compiled_step(config, params, 1, 512)[2]
      memory = analysis.memory_analysis()
      plans[f'{shape} {mode}'] = {
          'base_bytes': sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                            for x in jax.tree.leaves(params)),
          'argument_bytes': int(memory.argument_size_in_bytes),
          'temp_bytes': int(memory.temp_size_in_bytes), 'step_bytes': compiled_bytes(analysis)}
      print(f'{shape:>14} {mode:>5}: base {plans[f"{shape} {mode}"]["base_bytes"] / 2**20:9.1f} MiB,'
            f' step {plans[f"{shape} {mode}"]["step_bytes"] / 2**20:9.1f} MiB', flush=True)
  return plans


def hlo_widening(text: str) -> dict:
  """Over the optimized HLO: dots inside a fusion that takes 8/4-bit codes (fused), and dots
  that read an f32 buffer a fusion of codes wrote (materialized)."""
  computations = dict(re.findall(r'\n(?:ENTRY )?(%?[\w.\-]+) (?:\([^\n]*\) -> [^\n]*)?\{(.*?)\n\}', text,
                                 re.S))
  narrow = re.compile(r'\b[su](8|4)\[')

  def called(body):
    return re.findall(r'calls=(%?[\w.\-]+)', body)
  fused = materialized = 0
  widening_fusions = set()
  for name, body in computations.items():
    for line in body.splitlines():
      if ' fusion(' in line and any(narrow.search(computations.get(c, '')) and
                                    'dot(' not in computations.get(c, '') for c in called(line)):
        widening_fusions.add(line.split('=')[0].strip())
  for body in computations.values():
    for line in body.splitlines():
      if ' fusion(' in line:
        inner = ''.join(computations.get(c, '') for c in called(line))
        if 'dot(' in inner and narrow.search(inner):
          fused += inner.count('dot(')
      elif ' dot(' in line:
        operands = re.search(r'dot\(([^)]*)\)', line).group(1)
        if any(o.strip().split(' ')[-1] in widening_fusions for o in operands.split(',')):
          materialized += 1
  return {'dots_fused_with_widening': fused, 'dots_reading_a_widened_buffer': materialized}


def write(part: str, results: dict) -> None:
  path = _OUT.value.format(part=part)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'date': datetime.date.today().isoformat(), 'command': ' '.join(sys.argv),
               'machine': machine_lib.describe(), 'method': LORA.call_string(), **results}, f,
              indent=2)


def main(argv):
  del argv
  if 'memory' in _PARTS.value:
    write('memory', {'batch': 1, 'seq_len': 512, 'memory_plans': memory_plans()})
  if 'speed' in _PARTS.value:
    speed_and_hlo()


def speed_and_hlo():
  bases = {mode: aj.load_model(embedded.NAME, quant=mode) for mode in _MODES.value}
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, 49152, (8, 128)), jnp.int32)
           for k in ('tokens', 'targets')}
  batch.update(positions=jnp.tile(jnp.arange(128, dtype=jnp.int32), (8, 1)),
               segment_ids=jnp.ones((8, 128), jnp.int32), loss_mask=jnp.ones((8, 128), jnp.float32))
  prompt = [rng.integers(0, 49152, 64).tolist()]
  sides, hlo = {}, {}
  for mode, (config, params) in bases.items():
    step, abstract_state, compiled = compiled_step(config, params, 8, 128)
    model = Llama(config, peft=(LORA,))
    peft = model.init_peft(jax.random.key(0), params)['peft']
    optimizer = make_optimizer(['lora'], {'lora': method_settings(type(LORA))}, 100)
    variables = {'params': params, 'peft': peft}
    decode = functools.partial(generate_ids, Llama(config), {'params': params}, prompt)
    sides[mode] = (step, TrainState.create(peft, optimizer), params, decode)
    cache = Llama(config).init_cache(1, 65)
    lowered = jax.jit(lambda v, t, c: Llama(config).apply(v, t, cache=c)).lower(
        {'params': params}, jnp.zeros((1, 1), jnp.int32), cache)
    decode_step = lowered.compile()
    hlo[mode] = {**hlo_widening(decode_step.as_text()),
                 'decode_step_temp_bytes': int(decode_step.memory_analysis().temp_size_in_bytes)}
    decode(max_new_tokens=1)  # warm up: both lengths compiled
    decode(max_new_tokens=_NEW_TOKENS.value + 1)
    del variables, abstract_state, compiled
    print(f'{mode}: {hlo[mode]}', flush=True)
  raw = {mode: {'train_step_s': [], 'decode_s': [], 'prefill_s': []} for mode in bases}
  for round_index in range(_ROUNDS.value):
    order = list(bases) if round_index % 2 == 0 else list(bases)[::-1]
    for mode in order:
      step, state, params, decode = sides[mode]
      for _ in range(_TRAIN_STEPS.value):
        started = time.perf_counter()
        state, metrics = step(state, params, batch)
        jax.block_until_ready(metrics)
        raw[mode]['train_step_s'].append(time.perf_counter() - started)
      sides[mode] = (step, state, params, decode)
      started = time.perf_counter()
      decode(max_new_tokens=1)
      one = time.perf_counter() - started
      started = time.perf_counter()
      decode(max_new_tokens=_NEW_TOKENS.value + 1)
      raw[mode]['decode_s'].append(time.perf_counter() - started - one)
      raw[mode]['prefill_s'].append(one)
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{m} {1000 * raw[m]["decode_s"][-1] / _NEW_TOKENS.value:.1f} ms/token' for m in bases),
          flush=True)
  speed = {mode: {'train_tokens_per_s': 8 * 128 / statistics.median(r['train_step_s']),
                  'decode_ms_per_token': 1000 * statistics.median(r['decode_s']) / _NEW_TOKENS.value,
                  'base_bytes': sum(x.nbytes for x in jax.tree.leaves(bases[mode][1]))}
           for mode, r in raw.items()}
  for mode, s in speed.items():
    print(f'{mode:>5}: base {s["base_bytes"] / 2**20:6.1f} MiB, train {s["train_tokens_per_s"]:7.1f} '
          f'tokens/s, decode {s["decode_ms_per_token"]:6.1f} ms/token, {hlo[mode]}')
  write('speed', {'batch': 8, 'seq_len': 128, 'new_tokens': _NEW_TOKENS.value, 'speed': speed,
                  'hlo': hlo, 'raw': raw})


if __name__ == '__main__':
  command.run(main)
