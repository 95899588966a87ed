"""Every method over a base in blocks (int8): its logits are those of the widened base, it
trains a step, it decodes with the KV cache as without; and FSDP over 8 devices gives the
numbers of one, the codes and scales sharded by the weights' rules."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.model.quant import QuantizedWeight, widened
from additive_jax.model.quant_layout import layout_for, quantize_params
from additive_jax.train.mesh import make_mesh
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.loop import train_and_evaluate
from additive_jax.train.step import TrainState, train_step
from cli_helpers import ROOT, in_process_config
from conftest import relative_error, save_tiny_hf_llama, xla_flags
from sharded_helpers import assert_same_trainables, flat, train
from test_generation import CONFIG, METHODS, cached_logits, random_peft, tokens
from test_generation import params as generation_params  # noqa: F401 (a fixture)
from test_train_step import make_batch


@pytest.fixture(scope='module')
def blocked(generation_params):  # noqa: F811
  params = quantize_params(generation_params, layout_for(CONFIG, 'int8', 8))
  assert isinstance(params['layers']['mlp']['down_proj']['kernel'], QuantizedWeight)
  return jax.tree.map(jax.numpy.asarray, params)


# every method at least once: the README's five together (a bottleneck adapter, (IA)³, LoRA,
# prompt and prefix tuning), UniPELT's gates, and the methods with state or layers of their own
NAMES = ('houlsby+ia3+lora+prompt+prefix', 'unipelt', 'ptuning_lstm', 'ladder', 'loreft',
         'adaption_prompt')


@pytest.mark.parametrize('name', NAMES)
def test_every_method_trains_and_decodes_over_int8(blocked, name):
  model = Llama(CONFIG, peft=METHODS[name])
  variables = {'params': blocked, 'peft': random_peft(METHODS[name], widened(blocked), 1)}
  toks = tokens(3)
  full = jax.jit(model.apply)(variables, toks)
  # the blocks widened inside the model, or before it: the same weights, the same logits
  assert relative_error(full, jax.jit(model.apply)({**variables, 'params': widened(blocked)},
                                                  toks)) <= 1e-6
  assert relative_error(cached_logits(model, variables, toks, prompt_length=5), full) <= 1e-5

  settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in model.peft}
  optimizer = make_optimizer(list(variables['peft']), settings, total_steps=1)
  state = TrainState.create(variables['peft'], optimizer)
  batch = make_batch(np.random.RandomState(0), 2, 12, CONFIG.vocab_size)
  state, metrics = jax.jit(functools.partial(train_step, model, optimizer, 1))(state, blocked, batch)
  assert np.isfinite(float(metrics['loss']))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables['peft']),
                                                    jax.tree.leaves(state.peft))]
  assert any(moved), name


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tiny_sharded_int8')
  save_tiny_hf_llama(directory, vocab_size=128, num_hidden_layers=2)
  return str(directory)


def test_fsdp_over_eight_devices_with_int8_gives_the_numbers_of_one(checkpoint):
  one = train(checkpoint, make_mesh((1, 1, 1), devices=jax.devices()[:1]), quant='int8',
              quant_block=8)
  eight = train(checkpoint, make_mesh((2, 2, 2)), accumulation=2, quant='int8', quant_block=8)
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  assert_same_trainables(flat(eight[1].peft), flat(one[1].peft))
  widened_losses = train(checkpoint, make_mesh((1, 1, 1), devices=jax.devices()[:1]))[0]
  assert np.abs(np.asarray(one[0]) - widened_losses).max() > 1e-6  # the blocks are in use

  *_, params, fallback = eight
  assert not fallback
  q = params['layers']['self_attn']['q_proj']['kernel']  # [L, D/b, b, N, H]: the block axis unnamed
  assert q.codes.sharding.spec == P(None, 'fsdp', None, 'tensor', None)
  assert q.scale.sharding.spec == P(None, 'fsdp', None, 'tensor', None)
  down = params['layers']['mlp']['down_proj']['kernel']  # [L, F/b, b, D]
  assert down.codes.sharding.spec == P(None, 'tensor', None, 'fsdp')
  assert down.codes.addressable_shards[0].data.shape == (2, 5, 8, 24)
  assert params['embed_tokens']['embedding'].codes.sharding.spec == P('tensor', 'fsdp', None)


def test_a_run_over_int4_trains_and_is_scored_over_the_base_it_trained_over(
    tmp_path, tiny_with_tokenizer, small_sst2):
  """The trainer reads `config.base_quant`; `evaluate --workdir` loads the run's base in its
  blocks (`--base_quant=none` widens it: another perplexity); `generate --workdir` reads the
  run's base_quant as evaluate does."""
  config = in_process_config(tiny_with_tokenizer, small_sst2, [aj.peft.LoRA(rank=4, targets=('q', 'v'))])
  config.seq_len, config.num_steps, config.checkpoint_every = 32, 2, 2
  config.base_quant, config.base_quant_block = 'int4', 8
  train_and_evaluate(config, str(tmp_path))
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert np.isfinite(summary['final_loss'])
  def base_bytes(**quant):
    return sum(x.nbytes for x in jax.tree.leaves(aj.load_model(tiny_with_tokenizer, **quant)[1]))
  assert summary['base_bytes'] == base_bytes(quant='int4', quant_block=8)
  # the projections at 4.5 bits a weight, the embedding and head (most of the tiny model) at 8.5
  assert summary['base_bytes'] < 0.35 * base_bytes(), summary['base_bytes']

  def perplexity(*flags):
    out = tmp_path / 'scored.json'
    done = subprocess.run([sys.executable, '-m', 'additive_jax.evaluate', f'--workdir={tmp_path}',
                           '--metric=perplexity', '--limit=8', f'--output={out}', *flags],
                          cwd=ROOT, env={**os.environ, 'XLA_FLAGS': xla_flags(1)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())['results']['perplexity']['perplexity']
  assert perplexity() != perplexity('--base_quant=none')
