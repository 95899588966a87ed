"""aj.peft.Sequential (MAD-X): frozen bottleneck adapters read from files, then one trained.

Here: the formula at the sites, training leaves the frozen adapters bit for bit, counts,
cached decoding, the config entry and call string, a run from that entry, both file formats
and bad input; and AdapterHub's `Stack` itself on the same weights, both ways
(tests/adapterhub/sequential_*.py; the AdapterHub venv of tests/adapterhub/run.sh, made by
running it when missing; about 50 s on 2 shared cores, up to 80 s under load).
ADDITIVE_JAX_ADAPTERHUB=0 skips that one.
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.files import AdapterFileError, load_adapter, save_adapter
from additive_jax.peft.param_count import count_methods
from additive_jax.peft.registry import method_from_fields, parse_method
from additive_jax.train.config import entries_of
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.restore import restore_run
from additive_jax.train.step import TrainState, batch_loss, train_step
from adapter_files_helpers import assert_same_leaves, random_peft
from conftest import TINY, relative_error
from test_frozen_leaves import tiny_run_config
from test_generation import cached_logits
from test_train_step import make_batch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUSLBY = Bottleneck(5, 'houlsby', 'silu', scale=0.5)
PFEIFFER = Bottleneck(8, 'pfeiffer', 'gelu', scale=2.0)


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(TINY).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A Houlsby and a Pfeiffer adapter of random (non-zero) values as our adapter files."""
  paths = []
  for index, adapter in enumerate((HOUSLBY, PFEIFFER)):
    paths.append(str(tmp_path_factory.mktemp(f'source{index}')))
    save_adapter(paths[-1], (adapter,), random_peft((adapter,), TINY, seed=index), TINY)
  return tuple(paths)


@pytest.fixture(scope='module')
def mixed(sources, params):
  """(method, variables): both sources stacked under a trained Houlsby adapter of random values
  (at init its up-projection is zero)."""
  method = aj.peft.Sequential(adapters=sources, dim=4, placement='houlsby',
                              activation='relu').read_adapters(TINY)
  peft = Llama(TINY, peft=(method,)).init_peft(jax.random.key(0), params)['peft']
  trained = random_peft((method,), TINY, seed=5)['sequential']
  return method, {'params': params,
                  'peft': {'sequential': {**trained, 'frozen': peft['sequential']['frozen']}}}


def tokens(shape=(2, 9), seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(0, TINY.vocab_size, shape), jnp.int32)


def test_the_sites_compute_the_formula(mixed):
  """f_i = f_{i-1} + s_i·A_i(u_i), u_i = r + f_{i-1} (Pfeiffer) or f_{i-1} (Houlsby); after
  attention only the Houlsby adapters, in order; each hook returns f_n − f."""
  method, variables = mixed
  layer = jax.tree.map(lambda x: x[1], variables['peft']['sequential'])
  frozen = layer['frozen']
  rng = np.random.RandomState(0)
  r, f = (jnp.asarray(rng.randn(2, 3, 48), jnp.float32) for _ in range(2))
  f1 = f + HOUSLBY.adapter(frozen['0']['mlp'], f)
  f2 = f1 + PFEIFFER.adapter(frozen['1']['mlp'], r + f1)
  f3 = f2 + method.trained.adapter(layer['mlp'], f2)
  np.testing.assert_allclose(method.mlp_delta(layer, r, f), f3 - f, atol=1e-5)
  g1 = f + HOUSLBY.adapter(frozen['0']['attn'], f)
  g2 = g1 + method.trained.adapter(layer['attn'], g1)
  np.testing.assert_allclose(method.attn_delta(layer, r, f), g2 - f, atol=1e-5)
  assert relative_error(f3 - f, PFEIFFER.adapter(frozen['1']['mlp'], r + f)) > 0.1


def test_at_init_it_is_the_frozen_adapters_alone(sources, params):
  """The trained adapter starts as the identity (W_up = 0): a lone Pfeiffer source gives the
  logits of that Bottleneck."""
  method = aj.peft.Sequential(adapters=sources[1:], dim=4).read_adapters(TINY)
  peft = Llama(TINY, peft=(method,)).init_peft(jax.random.key(3), params)['peft']['sequential']
  alone = {'bottleneck': peft['frozen']['0']}
  assert_same_leaves(alone, load_adapter(sources[1], TINY)[1])
  np.testing.assert_array_equal(
      Llama(TINY, peft=(method,)).apply({'params': params, 'peft': {'sequential': peft}}, tokens()),
      Llama(TINY, peft=(PFEIFFER,)).apply({'params': params, 'peft': alone}, tokens()))


def test_training_moves_the_last_adapter_alone(mixed):
  method, variables = mixed
  model = Llama(TINY, peft=(method,))
  settings = {method.key: method_settings(type(method), {'schedule': 'constant',
                                                         'weight_decay': 0.5})}
  optimizer = make_optimizer([method.key], settings, 3,
                             frozen_keys={method.key: method.frozen_keys})
  state = TrainState.create(variables['peft'], optimizer)
  step = jax.jit(functools.partial(train_step, model, optimizer, 1))
  batch = make_batch(np.random.RandomState(0), 2, 12, TINY.vocab_size)
  for _ in range(3):
    state, _ = step(state, variables['params'], batch)
  before, after = variables['peft']['sequential'], state.peft['sequential']
  jax.tree.map(np.testing.assert_array_equal, after['frozen'], before['frozen'])
  for site in ('attn', 'mlp'):
    assert np.abs(after[site]['up'] - before[site]['up']).min() > 0
  grads = jax.grad(lambda p: batch_loss(model, p, variables['params'], batch)[0])(
      variables['peft'])['sequential']
  assert not any(np.any(g) for g in jax.tree.leaves(grads['frozen']))
  assert all(np.any(g) for g in jax.tree.leaves({k: grads[k] for k in ('attn', 'mlp')}))


def test_counts_trained_and_frozen(mixed):
  method, _ = mixed
  (count,) = count_methods((method,), TINY)
  per = lambda d: 2 * 48 * d + d + 48
  assert count.formula == count.leaves == 2 * 3 * per(4)
  assert count.frozen_formula == count.frozen == 2 * 3 * per(5) + 3 * per(8)
  # the docstring's example: SmolLM2's D = 576 and L = 30, a language adapter of reduction
  # factor 2 under a task one of 16 (the settings alone: counting reads no file)
  madx = aj.peft.Sequential(adapter_methods=('Bottleneck(dim=288)',), reduction_factor=16)
  (count,) = count_methods((madx,), TINY.replace(hidden_size=576, num_layers=30))
  assert (count.formula, count.leaves, count.frozen_formula, count.frozen) == (
      1_262_520, 1_262_520, 9_979_200, 9_979_200)


def test_cached_decoding_equals_the_full_forward_pass(mixed):
  method, variables = mixed
  model, toks = Llama(TINY, peft=(method,)), tokens()
  full = model.apply(variables, toks)
  assert relative_error(full, Llama(TINY).apply({'params': variables['params']}, toks)) > 1e-2
  assert relative_error(cached_logits(model, variables, toks, prompt_length=4), full) <= 1e-5


def test_config_entry_and_call_string(mixed, sources):
  method, _ = mixed
  assert parse_method(method.call_string()) == method
  entry = entries_of([method]).sequential
  assert entry.adapters == sources and entry.optimizer.learning_rate == 1e-3
  assert method_from_fields('sequential', entry) == method
  # a list, as a literal or a command line may give, is the same method
  assert aj.peft.Sequential(adapters=list(sources), dim=4, placement='houlsby',
                            activation='relu').read_adapters(TINY) == method


@pytest.mark.parametrize('format', ['aj', 'adapterhub'])
def test_adapter_files_round_trip(mixed, tmp_path, format):
  method, variables = mixed
  save_adapter(str(tmp_path), (method,), variables['peft'], TINY, format=format)
  (loaded,), peft = load_adapter(str(tmp_path), TINY)
  assert (loaded.stacked, loaded.trained) == (method.stacked, method.trained)
  assert_same_leaves(peft, variables['peft'])
  if format == 'aj':
    assert loaded == method
    fields = json.loads((tmp_path / 'aj_adapter_config.json').read_text())['methods'][0]
    assert (fields['num_params'], fields['num_frozen_params']) == (
        method.num_params(TINY), method.num_frozen_params(TINY))
  else:  # one AdapterHub adapter a directory, distinct names, the stacked ones read from there
    assert sorted(os.listdir(tmp_path)) == ['0', '1', '2']
    names = [json.loads((tmp_path / str(i) / 'adapter_config.json').read_text())['name']
             for i in range(3)]
    assert names == ['sequential_0', 'sequential_1', 'sequential_2']
    assert loaded.adapters == (str(tmp_path / '0'), str(tmp_path / '1'))
  model = Llama(TINY, peft=(loaded,))
  read_back = {'params': variables['params'], 'peft': peft}
  np.testing.assert_array_equal(model.apply(read_back, tokens()), model.apply(variables, tokens()))


def test_a_run_trains_it_from_its_config_entry(tmp_path, tiny_with_tokenizer, small_sst2):
  """`config.peft.sequential.adapters=(a directory,)`: the run reads the adapter's method into
  the entry, counts it frozen, trains the last adapter alone and restores from its workdir."""
  base, _ = aj.load_model(tiny_with_tokenizer)
  lang = str(tmp_path / 'lang')
  save_adapter(lang, (PFEIFFER,), random_peft((PFEIFFER,), base), base)
  entries = entries_of([aj.peft.Sequential(adapters=('set below',), dim=4)])
  entries.sequential.adapters = (lang,)  # as --config.peft.sequential.adapters="('…',)" does
  config = tiny_run_config(tiny_with_tokenizer, small_sst2, entries)
  summary = aj.train_and_evaluate(config, str(tmp_path / 'run'))
  assert config.peft.sequential.adapter_methods == (PFEIFFER.call_string(),)
  assert (summary['trainable_params'], summary['frozen_params']) == (
      Bottleneck(4).num_params(base), PFEIFFER.num_params(base))
  run = restore_run(str(tmp_path / 'run'))
  assert run.methods[0].stacked == (PFEIFFER,) and run.methods[0].adapters == (lang,)
  assert_same_leaves({'bottleneck': run.peft['sequential']['frozen']['0']},
                     load_adapter(lang, base)[1])
  assert np.abs(run.peft['sequential']['mlp']['up']).max() > 0  # trained from zero


@pytest.fixture(scope='module')
def parallel_source(tmp_path_factory):
  adapter = Bottleneck(4, 'parallel')
  path = str(tmp_path_factory.mktemp('parallel'))
  save_adapter(path, (adapter,), random_peft((adapter,), TINY), TINY)
  return path


@pytest.fixture(scope='module')
def lora_source(tmp_path_factory):
  adapter = aj.peft.LoRA(2, 4)
  path = str(tmp_path_factory.mktemp('lora'))
  save_adapter(path, (adapter,), random_peft((adapter,), TINY), TINY)
  return path


def test_bad_input_is_one_line(sources, parallel_source, lora_source, tmp_path, params):
  seq = aj.peft.Sequential
  with pytest.raises(ValueError, match=r'Sequential needs the frozen adapters it applies first'):
    seq(dim=4)
  with pytest.raises(ValueError, match=r"Sequential's trained adapter is a parallel adapter "
                                       r".*in AdapterHub's Stack a parallel adapter discards"):
    seq(adapters=sources, dim=4, placement='parallel')
  with pytest.raises(ValueError, match='Bottleneck takes exactly one of dim and reduction_factor'):
    seq(adapters=sources)
  with pytest.raises(ValueError, match=r"Sequential adapters must be a tuple of non-empty "
                                       r"strings, got 'runs/lang'"):
    seq(adapters='runs/lang', dim=4)
  with pytest.raises(ValueError, match='Sequential has 2 adapters and 1 adapter_methods'):
    seq(adapters=sources, adapter_methods=('Bottleneck(dim=4)',), dim=4)
  with pytest.raises(ValueError, match=rf'Sequential adapter {parallel_source} is a parallel '
                                       r'adapter \(Bottleneck\(dim=4, placement=.parallel.\)\)'):
    seq(adapters=(parallel_source,), dim=4).read_adapters(TINY)
  with pytest.raises(ValueError, match=rf'Sequential adapter {lora_source} holds LoRA\(.*\); '
                                       'Sequential stacks bottleneck adapters'):
    seq(adapters=(lora_source,), dim=4).read_adapters(TINY)
  with pytest.raises(AdapterFileError, match=rf'{tmp_path} holds no adapter'):
    seq(adapters=(str(tmp_path),), dim=4).read_adapters(TINY)
  with pytest.raises(ValueError, match=r"Sequential\(adapters=.*\) has not read its adapters: a "
                                       r'run reads them when it starts; in Python call its '
                                       r'read_adapters\(config\)'):
    Llama(TINY, peft=(seq(adapters=sources, dim=4),))
  # a source that changed since the method read it
  stale = seq(adapters=sources[:1], adapter_methods=(PFEIFFER.call_string(),), dim=4)
  with pytest.raises(ValueError, match=rf"{sources[0]} holds Bottleneck\(dim=5, placement="
                                       r"'houlsby'.*not the Bottleneck\(dim=8.*Sequential was "
                                       'built'):
    Llama(TINY, peft=(stale,)).init_peft(jax.random.key(0), params)
  os.makedirs(tmp_path / 'stack' / '0')
  (tmp_path / 'stack' / '0' / 'adapter_config.json').write_text('{}')
  with pytest.raises(AdapterFileError, match=r'stack: a Stack is AdapterHub adapter directories '
                                             r'0, 1, … \(at least two: the last one trains\), '
                                             r'found 1 numbered'):
    load_adapter(str(tmp_path / 'stack'), TINY)


@pytest.mark.skipif(os.environ.get('ADDITIVE_JAX_ADAPTERHUB') == '0',
                    reason='AdapterHub cross-check skipped (ADDITIVE_JAX_ADAPTERHUB=0)')
def test_adapterhub_stack_on_the_same_weights_both_ways(tmp_path):
  cache = os.environ.get('ADDITIVE_JAX_CACHE', os.path.expanduser('~/.cache/additive_jax'))
  venv = os.path.join(cache, 'adapterhub-venv')  # where run.sh makes it
  env = {**os.environ, 'MAIN_PYTHON': sys.executable}
  if not os.path.exists(os.path.join(venv, 'complete')):  # run.sh makes it (and checks its own)
    subprocess.run(['bash', os.path.join(REPOSITORY, 'tests', 'adapterhub', 'run.sh')], env=env,
                   check=True, capture_output=True, timeout=1200)
  here = os.path.join(REPOSITORY, 'tests', 'adapterhub')
  steps = [[sys.executable, os.path.join(here, 'sequential_jax.py'), 'export', str(tmp_path)],
           [os.path.join(venv, 'bin', 'python'), os.path.join(here, 'sequential_side.py'),
            str(tmp_path)],
           [sys.executable, os.path.join(here, 'sequential_jax.py'), 'compare', str(tmp_path)]]
  for command in steps:
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                            timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.count('max relative error') == 1 + 2 * 3 + 3 + 2 + 1
