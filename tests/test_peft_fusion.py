"""AdapterFusion (peft/fusion.py): counts, what trains and what stays frozen, the temperature and
the regularization, decoding with a KV cache, our files and AdapterHub's layout both ways, a run
restored from its workdir alone, and bad input. Its parity with AdapterHub's `Fuse` on the same
weights is in tests/adapterhub/ (test_adapter_files_adapterhub.py)."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.eval.decode import generate
from additive_jax.export import export_run
from additive_jax.model.kv_cache import KVCache
from additive_jax.model.llama import Llama
from additive_jax.peft.files import AdapterFileError
from additive_jax.peft.fusion import Fusion
from additive_jax.peft.param_count import count_methods
from additive_jax.peft.registry import method_from_fields, parse_method
from additive_jax.train.frozen_sources import read_sources
from additive_jax.train.loss import methods_extra_loss
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.restore import restore_run
from additive_jax.train.step import TrainState, train_step
from adapter_files_helpers import random_peft
from cli_helpers import ROOT, in_process_config
from conftest import LLAMA_3_2_1B, TINY, relative_error, xla_flags
from test_train_step import make_batch

PFEIFFER = (aj.peft.Bottleneck(dim=4, activation='gelu'), aj.peft.Bottleneck(dim=6, scale=0.5))
HOULSBY = (aj.peft.Bottleneck(dim=4, placement='houlsby'),
           aj.peft.Bottleneck(dim=3, placement='houlsby', activation='silu'))


def fusion_of(adapters, **fields):
  return Fusion(adapter_methods=tuple(m.call_string() for m in adapters), **fields)


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(TINY).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']


def save_adapters(directory, adapters, config=TINY, formats=('aj', 'adapterhub')):
  """Each adapter with random (non-zero) values in its own folder, alternating formats."""
  paths = []
  for n, method in enumerate(adapters):
    path = os.path.join(directory, f'adapter{n}')
    aj.peft.save_adapter(path, (method,), random_peft((method,), config, seed=n), config,
                         format=formats[n % len(formats)])
    paths.append(path)
  return paths


@pytest.mark.parametrize('fusion', [
    fusion_of(PFEIFFER), fusion_of(HOULSBY, projections=('query', 'key'), temperature=True),
    fusion_of(PFEIFFER + PFEIFFER[:1], projections=('value',))], ids=['dynamic', 'static', 'value'])
def test_formula_equals_leaves_trainable_and_frozen(fusion):
  for config in (TINY, LLAMA_3_2_1B):
    (count,) = count_methods((fusion,), config)
    assert (count.formula, count.frozen_formula) == (count.leaves, count.frozen), fusion
  d, layers = 2048, 16
  if fusion.projections == ('query', 'key', 'value'):  # Llama-3.2-1B, dynamic: 3·D² + 2·D a layer
    assert count.leaves == layers * (3 * d * d + 2 * d) == 201_392_128
    assert count.frozen == sum(m.num_params(LLAMA_3_2_1B) for m in PFEIFFER)
  if fusion.temperature:
    assert count.frozen == sum(m.num_params(LLAMA_3_2_1B) for m in HOULSBY) + 1


def test_smollm2_dynamic_count_is_the_docstrings():
  config = aj.LlamaConfig.from_hf(json.loads(json.dumps(dict(
      model_type='llama', vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
      tie_word_embeddings=True))))
  (count,) = count_methods((fusion_of(PFEIFFER),), config)
  assert count.leaves == 29_894_400


def test_two_copies_of_one_adapter_fuse_to_that_adapter(params):
  """With every adapter the same and W_v = I, Σ_n p_n W_v u_n = u: the adapter alone."""
  adapter = PFEIFFER[0]
  tree = random_peft((adapter,), TINY)['bottleneck']
  fusion = fusion_of((adapter, adapter))
  peft = Llama(TINY, peft=(fusion,)).init_peft(jax.random.key(1), params)['peft']
  peft['fusion']['adapters'] = {'0': tree, '1': tree}
  peft['fusion']['mlp']['value'] = jnp.broadcast_to(jnp.eye(48), (3, 48, 48))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 101, (2, 7)))
  fused = Llama(TINY, peft=(fusion,)).apply({'params': params, 'peft': peft}, tokens)
  alone = Llama(TINY, peft=(adapter,)).apply({'params': params, 'peft': {'bottleneck': tree}},
                                            tokens)
  assert relative_error(fused, alone) < 1e-6
  base = Llama(TINY).apply({'params': params}, tokens)
  assert relative_error(alone, base) > 1e-2


def test_init_reads_the_adapters_and_sets_adapterhubs_initial_values(params, tmp_path):
  paths = save_adapters(str(tmp_path), PFEIFFER)
  fusion = Fusion.of(paths, TINY, temperature=True)
  assert fusion.adapter_methods == tuple(m.call_string() for m in PFEIFFER)
  peft = Llama(TINY, peft=(fusion,)).init_peft(jax.random.key(0), params)['peft']['fusion']
  for n, path in enumerate(paths):
    _, saved = aj.peft.load_adapter(path, TINY)
    jax.tree.map(np.testing.assert_array_equal, peft['adapters'][str(n)], saved['bottleneck'])
  value = np.asarray(peft['mlp']['value'][0])
  assert np.all(np.diag(value) == 1) and np.all(value[~np.eye(48, dtype=bool)] == np.float32(1e-6))
  assert abs(float(np.std(peft['mlp']['query'])) - 0.02) < 2e-3
  assert not np.any(peft['mlp']['query_bias']) and float(peft['temperature']) == 50
  assert parse_method(fusion.call_string()) == fusion
  entry = json.loads(json.dumps(dataclasses.asdict(fusion)))  # a checkpoint's config: lists
  assert method_from_fields('fusion', entry) == fusion


def train(fusion, params, steps, weight_decay=0.1, learning_rate=1e-2):
  """(initial peft, final state, metrics of every step) of `steps` jitted steps."""
  model = Llama(TINY, peft=(fusion,))
  peft = model.init_peft(jax.random.key(1), params)['peft']
  peft['fusion']['adapters'] = {str(n): random_peft((m,), TINY, seed=n)['bottleneck']
                                for n, m in enumerate(fusion.fused)}
  settings = {'fusion': method_settings(Fusion, {'schedule': 'constant', 'weight_decay': weight_decay,
                                                 'learning_rate': learning_rate})}
  optimizer = make_optimizer(['fusion'], settings, steps, frozen_keys={'fusion': Fusion.frozen_keys})
  step = jax.jit(functools.partial(train_step, model, optimizer, 1))
  state, metrics = TrainState.create(peft, optimizer), []
  batch = make_batch(np.random.RandomState(0), 2, 12, TINY.vocab_size)
  for _ in range(steps):
    state, line = step(state, params, batch)
    metrics.append(line)
  return peft, state, metrics


def test_only_the_fusion_layers_train_and_the_temperature_follows_the_steps(params):
  fusion = fusion_of(HOULSBY, temperature=True)
  initial, state, _ = train(fusion, params, steps=3)
  jax.tree.map(np.testing.assert_array_equal, state.peft['fusion']['adapters'],
               initial['fusion']['adapters'])  # weight decay 0.1: bit for bit all the same
  for site in ('attn', 'mlp'):
    for leaf, before in initial['fusion'][site].items():
      moved = np.abs(state.peft['fusion'][site][leaf] - before).max()
      # b_k adds the same q·b_k to every adapter's score, which the softmax ignores: its
      # gradient is zero but for rounding (so in AdapterHub's BertFusion too)
      assert moved < 1e-5 if leaf == 'key_bias' else moved > 1e-3, (site, leaf, moved)
  assert float(state.peft['fusion']['temperature']) == pytest.approx(50 - 3 * 0.05)
  # Adam's moments: the fusion layers' shapes only, never an adapter's ([L, D, R], [L, R])
  shapes = {leaf.shape for leaf in jax.tree.leaves(state.opt_state)}
  assert shapes == {(), (3, 48, 48), (3, 48)}, shapes
  assert fusion.after_step({'temperature': 50.0}, 2000)['temperature'] == 1.0


def test_the_regularization_is_adapterhubs_term_from_the_second_step(params):
  fusion = fusion_of(HOULSBY)
  tree = random_peft((fusion,), TINY)['fusion']
  eye = np.eye(48)
  expected = 0.01 * sum(np.sum((eye - np.asarray(tree[site]['value'][layer]).T) ** 2)
                        for site in ('attn', 'mlp') for layer in range(3))
  assert float(methods_extra_loss((fusion,), {'fusion': tree}, 1)) == pytest.approx(expected,
                                                                                   rel=1e-5)
  assert float(methods_extra_loss((fusion,), {'fusion': tree}, 0)) == 0
  assert methods_extra_loss((dataclasses.replace(fusion, regularization=False),),
                            {'fusion': tree}, 1) is None
  assert methods_extra_loss((fusion_of(HOULSBY, projections=('query', 'key')),),
                            {'fusion': tree}, 1) is None
  # in the step: its gradient joins from step 1 on (AdapterHub adds it after step 0's zero_grad)
  norms = {}
  for regularize in (True, False):
    _, _, metrics = train(dataclasses.replace(fusion, regularization=regularize), params, steps=2,
                          learning_rate=0.5)
    norms[regularize] = [float(m['grad_norm']) for m in metrics]
  assert norms[True][0] == norms[False][0] and norms[True][1] > norms[False][1] + 1e-3, norms


def test_decodes_with_a_kv_cache(params):
  fusion = fusion_of(PFEIFFER, query_before_ln=True, temperature=True)
  peft = random_peft((fusion,), TINY, seed=3)
  peft['fusion']['temperature'] = np.float32(7.0)
  model, variables = Llama(TINY, peft=(fusion,)), {'params': params, 'peft': peft}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 101, (2, 9)))
  full = model.apply(variables, tokens)
  logits, cache = model.apply(variables, tokens[:, :5], cache=KVCache.create(TINY, 2, 9))
  steps = [logits]
  for t in range(5, 9):
    logits, cache = model.apply(variables, tokens[:, t:t + 1], cache=cache)
    steps.append(logits)
  assert relative_error(jnp.concatenate(steps, axis=1), full) < 1e-5
  assert relative_error(full, Llama(TINY).apply({'params': params}, tokens)) > 1e-2


@pytest.mark.parametrize('adapters, fields', [
    (PFEIFFER, {'temperature': True}),
    (HOULSBY, {'projections': ('query', 'key'), 'residual_before': True,
               'value_before_softmax': False})], ids=['pfeiffer', 'houlsby'])
def test_our_files_and_adapterhubs_layout_both_ways(params, tmp_path, adapters, fields):
  fusion = fusion_of(adapters, **fields)
  peft = random_peft((fusion,), TINY, seed=4)
  if fusion.temperature:
    peft['fusion']['temperature'] = np.float32(50.0)  # AdapterHub's files keep no other T
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 101, (2, 7)))
  expected = Llama(TINY, peft=(fusion,)).apply({'params': params, 'peft': peft}, tokens)
  for format in ('aj', 'adapterhub'):
    out = str(tmp_path / format)
    aj.peft.save_adapter(out, (fusion,), peft, TINY, format=format)
    methods, loaded = aj.peft.load_adapter(out, TINY)
    assert dataclasses.replace(methods[0], adapters=()) == fusion, format
    jax.tree.map(np.testing.assert_array_equal, loaded, peft)
    logits = Llama(TINY, peft=methods).apply({'params': params, 'peft': loaded}, tokens)
    np.testing.assert_array_equal(logits, expected)
  hub = tmp_path / 'adapterhub'
  assert sorted(os.listdir(hub)) == ['adapter0', 'adapter0,adapter1', 'adapter1',
                                     'adapter_setup.json']
  alone = aj.peft.load_adapter(str(hub / 'adapter0,adapter1'), TINY)  # the fusion folder alone
  assert alone[0] == aj.peft.load_adapter(str(hub), TINY)[0]
  record = json.loads((tmp_path / 'aj' / 'aj_adapter_config.json').read_text())['methods'][0]
  assert record['num_frozen_params'] == fusion.num_frozen_params(TINY)
  assert record['adapter_type'] == 'fusion' and record['value'] == ('value' in fusion.projections)


def message_of(call):
  with pytest.raises(ValueError) as err:
    call()
  return str(err.value)


def test_bad_input_is_one_clear_line(tmp_path, params):
  good = save_adapters(str(tmp_path / 'good'), PFEIFFER)
  houlsby = save_adapters(str(tmp_path / 'houlsby'), HOULSBY[:1])
  lora = aj.peft.LoRA(rank=2, alpha=4)
  aj.peft.save_adapter(str(tmp_path / 'lora'), (lora,), random_peft((lora,), TINY), TINY)
  wide = TINY.replace(hidden_size=96)
  other_base = save_adapters(str(tmp_path / 'wide'), PFEIFFER[:1], config=wide)
  parallel = save_adapters(str(tmp_path / 'parallel'),
                           (aj.peft.Bottleneck(dim=4, placement='parallel'),) * 2)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  cases = {
      f'{tmp_path}/empty holds no adapter (no aj_adapter_config.json or adapter_config.json)':
          lambda: Fusion.of([str(tmp_path / 'empty'), good[0]], TINY),
      f'{tmp_path}/run is a run folder, not an adapter file directory':
          lambda: Fusion.of([str(tmp_path / 'run'), good[0]], TINY),
      "Fusion adapters must share one placement, got ['houlsby', 'pfeiffer']":
          lambda: Fusion.of([good[0], houlsby[0]], TINY),
      'Fusion fuses ungated bottleneck adapters (Pfeiffer, Houlsby); LoRA(rank=2, alpha=4) is none':
          lambda: Fusion.of([good[0], str(tmp_path / 'lora')], TINY),
      'Fusion needs at least 2 adapters to fuse, got 1': lambda: Fusion.of(good[:1], TINY),
      "the adapter was saved for a base with hidden_size=96 (this model: 48)":
          lambda: Fusion.of([good[0], other_base[0]], TINY),
      "Fusion of parallel adapters is refused: AdapterHub's Fuse adds the residual a second time":
          lambda: Fusion.of(parallel, TINY),
      "does not know its adapters' methods: build it with aj.peft.Fusion.of(adapters, config)":
          lambda: Llama(TINY, peft=(Fusion(adapters=tuple(good)),)),
  }
  for expected, call in cases.items():
    message = message_of(call)
    assert expected in message and '\n' not in message, (expected, message)
  # the trainer names the config entry, before anything heavy
  config = in_process_config(str(tmp_path), str(tmp_path), [Fusion(adapters=(good[0], houlsby[0]))])
  config.model = str(tmp_path / 'good' / 'tiny')
  aj.peft.save_merged(config.model, Llama(TINY), {'params': params})
  (tmp_path / 'no_adapter').mkdir()
  config.peft.fusion.adapters = (good[0], str(tmp_path / 'no_adapter'))
  assert message_of(lambda: read_sources(config, str(tmp_path / 'workdir'))).startswith(
      f'config.peft.fusion: {tmp_path}/no_adapter holds no adapter')
  # AdapterHub's fusion folder without its adapters beside it
  hub = tmp_path / 'hub'
  fusion = fusion_of(PFEIFFER)
  aj.peft.save_adapter(str(hub), (fusion,), random_peft((fusion,), TINY), TINY, format='adapterhub')
  shutil.move(str(hub / 'adapter0,adapter1'), str(tmp_path / 'alone'))
  assert 'holds an AdapterHub fusion layer alone; its adapters adapter0, adapter1 are not beside' \
      in message_of(lambda: aj.peft.load_adapter(str(tmp_path / 'alone'), TINY))


@pytest.fixture(scope='module')
def fusion_run(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """A 2-step fusion run (a config as configs/sst2.py's, `config.peft` a fusion entry) of two
  adapter files, one ours, one AdapterHub's; the adapter files deleted after it."""
  base, _ = aj.load_model(tiny_with_tokenizer)
  sources = tmp_path_factory.mktemp('sources')
  paths = save_adapters(str(sources), PFEIFFER, config=base)
  config = in_process_config(tiny_with_tokenizer, small_sst2,
                             [Fusion(adapters=tuple(paths), temperature=True)])
  config.seq_len, config.num_steps, config.checkpoint_every = 32, 2, 2
  workdir = tmp_path_factory.mktemp('fusion_run')
  summary = aj.train_and_evaluate(config, str(workdir))
  expected = {n: aj.peft.load_adapter(path, base)[1]['bottleneck'] for n, path in enumerate(paths)}
  shutil.rmtree(sources)
  return str(workdir), summary, expected


def test_a_fusion_run_restores_evaluates_generates_and_exports_from_its_workdir_alone(
    fusion_run, tiny_with_tokenizer, small_sst2, tmp_path):
  workdir, summary, expected = fusion_run
  base, params = aj.load_model(tiny_with_tokenizer)
  fusion = fusion_of(PFEIFFER, temperature=True)
  assert summary['trainable_params'] == fusion.num_params(base)
  assert summary['frozen_params'] == fusion.num_frozen_params(base)
  run = restore_run(workdir)
  for n, tree in expected.items():
    jax.tree.map(np.testing.assert_array_equal, run.peft['fusion']['adapters'][str(n)], tree)
  assert float(run.peft['fusion']['temperature']) == pytest.approx(50 - 2 * 0.05)
  model, variables = Llama(base, peft=run.methods), {'params': params, 'peft': run.peft}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, base.vocab_size, (1, 6)))
  logits = model.apply(variables, tokens)
  for format in ('aj', 'adapterhub'):
    out = export_run(workdir, format, out=str(tmp_path / format))
    methods, peft = aj.peft.load_adapter(out, base)
    if format == 'adapterhub':  # AdapterHub's files keep no temperature: its T starts at 50
      peft['fusion']['temperature'] = run.peft['fusion']['temperature']
    assert relative_error(Llama(base, peft=methods).apply({'params': params, 'peft': peft},
                                                          tokens), logits) < 1e-6
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  prompt = 'Review: a gentle film\nSentiment:'
  result = subprocess.run([sys.executable, '-m', 'additive_jax.generate', f'--workdir={workdir}',
                           f'--prompt={prompt}', '--max_new_tokens=4'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  [text] = generate(model, variables, aj.load_tokenizer(tiny_with_tokenizer), [prompt],
                    max_new_tokens=4, chat=False)
  assert result.stdout == text + '\n'
  result = subprocess.run([sys.executable, '-m', 'additive_jax.evaluate', f'--workdir={workdir}',
                           '--split=test', '--metric=perplexity', '--limit=8'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(open(os.path.join(workdir, 'eval_test.json')).read())
  assert record['step'] == 2 and np.isfinite(record['results']['perplexity']['perplexity'])
