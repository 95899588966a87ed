"""The train step: every method, every pair and the README's example of three train, only
variables['peft'] moves, and no gradient is ever computed for a frozen weight."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.ladder import LadderSide
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.peft.ptuning import PTuning
from additive_jax.peft.reft import ReFT
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.step import TrainState, batch_loss, train_step
from conftest import TINY

# Every size unique, so a tensor's shape says what it is: D 48, F 80, N·H 6·8, K·H 2·8, V 101, L 3.
CONFIG = TINY
ALL_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
SINGLES = {
    'pfeiffer': Bottleneck(dim=4),
    'houlsby': Bottleneck(dim=4, placement='houlsby', activation='gelu'),
    'parallel': Bottleneck(dim=4, placement='parallel', activation='silu', scale=2.0),
    'ia3': IA3(),
    'lora': LoRA(rank=2, alpha=4, targets=ALL_TARGETS),
    'prompt': PromptTuning(num_tokens=3),
    'prefix': PrefixTuning(num_tokens=3),
    'prefix_projection': PrefixTuning(num_tokens=2, projection_dim=5),
    'ptuning_lstm': PTuning(num_tokens=3, encoder='lstm', encoder_hidden=5),
    'ladder': LadderSide(reduction=2),
    'loreft': ReFT(rank=2, prefix_positions=2, suffix_positions=2),
}
# Every pair of methods that can train together (LST refuses a partner inside the backbone).
PAIRS = [(a, b) for a, b in itertools.combinations(['pfeiffer', 'ia3', 'lora', 'prompt', 'prefix'], 2)]
# The combination the README gives as its example: an adapter, (IA)³ and a prefix in one run.
README_TRIPLE = ('houlsby', 'ia3', 'prefix_projection')


@pytest.fixture(scope='module')
def params():
  return nn.unbox(jax.jit(Llama(CONFIG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']


def make_batch(rng, batch, length, vocab):
  """Two packed segments a row, a padded tail, and a loss on the second half of each segment."""
  tokens = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
  split, end = length // 2, length - 2
  segment_ids = np.zeros((batch, length), np.int32)
  segment_ids[:, :split], segment_ids[:, split:end] = 1, 2
  positions = np.zeros((batch, length), np.int32)
  positions[:, :split] = np.arange(split)
  positions[:, split:end] = np.arange(end - split)
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, split // 2:split] = 1
  loss_mask[:, split + (end - split) // 2:end] = 1
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': loss_mask,
          'positions': positions, 'segment_ids': segment_ids}


@pytest.fixture(scope='module')
def batch():
  return make_batch(np.random.RandomState(0), 2, 12, CONFIG.vocab_size)


def run_steps(methods, params, batch, steps, accumulation=1):
  """(losses, initial peft, final peft) after `steps` jitted steps at each method's default lr."""
  model = Llama(CONFIG, peft=tuple(methods))
  peft = model.init_peft(jax.random.key(1), params)['peft']
  settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in methods}
  optimizer = make_optimizer(list(peft), settings, total_steps=steps)
  step = jax.jit(functools.partial(train_step, model, optimizer, accumulation))
  state, losses = TrainState.create(peft, optimizer), []
  for _ in range(steps):
    state, metrics = step(state, params, batch)
    losses.append(float(metrics['loss']))
  return losses, peft, state.peft


def assert_trains(methods, params, batch):
  frozen = jax.tree.map(np.array, params)
  losses, initial, final = run_steps(methods, params, batch, steps=3)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  # Step 1 moves what has a gradient at init (e.g. W_up, LoRA B); by step 3 every leaf has moved.
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(initial),
                                   jax.tree.leaves(final)):
    assert not np.array_equal(np.asarray(before), np.asarray(after)), jax.tree_util.keystr(path)
  jax.tree.map(np.testing.assert_array_equal, params, frozen)  # the base, bit for bit


@pytest.mark.parametrize('name', list(SINGLES))
def test_every_method_trains_and_only_its_leaves_move(params, batch, name):
  assert_trains([SINGLES[name]], params, batch)


@pytest.mark.parametrize('names', PAIRS + [README_TRIPLE], ids='+'.join)
def test_every_pair_of_methods_and_the_readme_triple_trains(params, batch, names):
  assert_trains([SINGLES[name] for name in names], params, batch)


def test_accumulation_equals_one_whole_batch(params):
  """Micro-batches add token-weighted losses and gradients: the same step as the whole batch."""
  batch = make_batch(np.random.RandomState(3), 4, 12, CONFIG.vocab_size)
  batch['loss_mask'][0] = 0  # uneven loss tokens per micro-batch: a plain mean of means differs
  methods = [SINGLES['pfeiffer'], SINGLES['ia3']]
  whole = run_steps(methods, params, batch, steps=2, accumulation=1)
  split = run_steps(methods, params, batch, steps=2, accumulation=2)
  np.testing.assert_allclose(whole[0], split[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), whole[2], split[2])


def weight_gradient_shapes(fn, *args):
  """Output shapes of every dot_general and scatter-add in fn's jaxpr, sub-jaxprs included:
  the operations that build a weight's gradient (x^T · dy for a kernel, a scatter for a table).
  Sorted, since a gradient may be built transposed ([V, D] for a [D, V] kernel)."""
  shapes = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('dot_general', 'scatter-add', 'scatter_add'):
        shapes.update(tuple(sorted(v.aval.shape)) for v in eqn.outvars)
    for sub in jax.extend.core.subjaxprs(jaxpr):
      visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def frozen_weight_shapes(params):
  """Each base weight's shape, whole and per layer (the scan computes layer slices), sorted."""
  shapes = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    shapes.add(tuple(sorted(leaf.shape)))
    if path[0].key == 'layers':
      shapes.add(tuple(sorted(leaf.shape[1:])))
  return shapes


@pytest.mark.parametrize('methods', [
    ('pfeiffer', 'ia3', 'lora', 'prompt', 'prefix', 'loreft'), ('houlsby',), ('parallel',),
    ('ladder',)],
    ids='+'.join)
def test_no_gradient_is_computed_for_a_frozen_weight(params, methods):
  batch = make_batch(np.random.RandomState(0), 5, 12, CONFIG.vocab_size)  # B = 5: a unique size
  model = Llama(CONFIG, peft=tuple(SINGLES[name] for name in methods))
  peft = model.init_peft(jax.random.key(1), params)['peft']
  loss = lambda peft, params: batch_loss(model, peft, params, batch)[0]
  frozen = frozen_weight_shapes(params)
  assert not frozen & weight_gradient_shapes(jax.grad(loss), peft, params)
  # The detector can fail: differentiating the base as well builds every kernel's gradient.
  both = weight_gradient_shapes(jax.grad(loss, argnums=(0, 1)), peft, params)
  kernels = {(6, 8, 48), (2, 8, 48), (48, 80), (48, 101)}  # q and o, k and v, MLP, head and table
  if methods == ('ladder',):  # the backbone runs under stop_gradient: only the LM head has one
    kernels = {(48, 101)}
  assert kernels <= frozen & both


SENTENCE = ('it \'s a charming and often affecting journey , a film that takes its time and '
            'rewards the patience of an audience willing to follow the quiet lives it watches , '
            'and the performances are uniformly strong .')


@pytest.mark.parametrize('method', [
    Bottleneck(dim=16), Bottleneck(dim=8, placement='houlsby'), Bottleneck(dim=8, placement='parallel'),
    IA3(), LoRA(rank=4, alpha=8), PromptTuning(num_tokens=4), PrefixTuning(num_tokens=4),
    LadderSide(reduction=8), ReFT(rank=4, prefix_positions=7)], ids=lambda m: m.call_string())
def test_a_step_on_smollm2(smollm2, smollm2_tokenizer, method):
  """1×32-token steps of each method on the real SmolLM2-135M and real text: it learns. The
  learning rate is small (1e-4) so that the first step must lower the loss to first order; at
  the defaults, a step from a random prefix can overshoot on one batch."""
  config, params = smollm2
  model = Llama(config, peft=(method,))
  peft = model.init_peft(jax.random.key(0), params)['peft']
  ids = smollm2_tokenizer(SENTENCE)['input_ids'][:33]
  assert len(ids) == 33
  batch = {'tokens': np.asarray([ids[:-1]], np.int32), 'targets': np.asarray([ids[1:]], np.int32),
           'loss_mask': np.ones((1, 32), np.float32), 'positions': np.arange(32)[None],
           'segment_ids': np.ones((1, 32), np.int32)}
  settings = method_settings(type(method), {'schedule': 'constant', 'learning_rate': 1e-4})
  optimizer = make_optimizer([method.key], {method.key: settings}, total_steps=2)
  step = jax.jit(functools.partial(train_step, model, optimizer, 1))
  state, first = step(TrainState.create(peft, optimizer), params, batch)
  state, second = step(state, params, batch)
  assert np.isfinite(float(first['loss'])) and float(first['grad_norm']) > 0
  assert float(second['loss']) < float(first['loss'])


def test_bf16_compute_keeps_fp32_trainables_optimizer_state_and_loss(params, batch):
  """bf16 compute (as on accelerators): the trainable leaves, Adam's moments and the loss stay
  fp32, and the loss is the fp32 one to bf16 accuracy (8 bits of mantissa: ~1e-2 relative)."""
  methods = (SINGLES['pfeiffer'], SINGLES['lora'])
  model = Llama(CONFIG.replace(dtype=jnp.bfloat16), peft=methods)
  peft = model.init_peft(jax.random.key(1), params)['peft']
  settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in methods}
  optimizer = make_optimizer(list(peft), settings, total_steps=1)
  state, metrics = jax.jit(functools.partial(train_step, model, optimizer, 1))(
      TrainState.create(peft, optimizer), params, batch)
  assert {x.dtype for x in jax.tree.leaves(state.peft)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
  assert metrics['loss'].dtype == jnp.float32
  fp32_loss, _, _ = run_steps(methods, params, batch, steps=1)
  assert float(metrics['loss']) == pytest.approx(fp32_loss[0], rel=2e-2)
  assert float(metrics['loss']) != fp32_loss[0]  # the compute did run in bf16


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_gradients_under_remat_equal_those_without(params, batch, remat):
  """Activation checkpointing recomputes the forward pass; it must not change a gradient."""
  methods = (SINGLES['houlsby'], SINGLES['ia3'], SINGLES['lora'], SINGLES['prefix'])
  peft = Llama(CONFIG, peft=methods).init_peft(jax.random.key(1), params)['peft']
  rng = np.random.RandomState(3)  # away from the identity init, so every leaf has a gradient
  peft = jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rng.randn(*x.shape), jnp.float32), peft)

  def gradients(config):
    loss = lambda p: batch_loss(Llama(config, peft=methods), p, params, batch)[0]
    return jax.jit(jax.grad(loss))(peft)

  plain, checkpointed = gradients(CONFIG), gradients(CONFIG.replace(remat=remat))
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(checkpointed)):
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_a_bf16_stored_base_trains_with_fp32_trainables(params, batch):
  """A base stored in bf16 (half the memory) trains: the trainables, their gradients and Adam's
  moments stay fp32, the loss falls, and the base is not touched."""
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  config = CONFIG.replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  methods = (SINGLES['pfeiffer'], SINGLES['lora'])
  model = Llama(config, peft=methods)
  peft = model.init_peft(jax.random.key(1), params_bf16)['peft']
  settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in methods}
  optimizer = make_optimizer(list(peft), settings, total_steps=3)
  step = jax.jit(functools.partial(train_step, model, optimizer, 1))
  state, losses = TrainState.create(peft, optimizer), []
  for _ in range(3):
    state, metrics = step(state, params_bf16, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  assert {x.dtype for x in jax.tree.leaves((state.peft, state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(params_bf16)} == {jnp.dtype(jnp.bfloat16)}
