"""The model and the train step with a kernel attention ('pallas', in Pallas's interpreter on
a CPU) equal them with 'xla': packed rows, prompt and prefix slots, and on an 8-device mesh,
where the kernel runs per shard of the batch (`attention.attend_on_mesh`)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model.llama import Llama
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.train.config import RULES
from additive_jax.train.mesh import global_batch, make_mesh, replicated
from additive_jax.train.model_state import create_train_state
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.step import batch_loss, jit_train_step
from conftest import TINY, relative_error
from test_masked_logits import moved, packed_batch

METHODS = (PromptTuning(num_tokens=3), PrefixTuning(num_tokens=2), LoRA(rank=2, alpha=4))


def models(rows=3):
  configs = {name: dataclasses.replace(TINY, attention=name) for name in ('xla', 'pallas')}
  params = nn.unbox(Llama(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  return {name: Llama(config, peft=METHODS) for name, config in configs.items()}, params


def test_pallas_model_equals_xla_in_loss_and_gradients():
  by_name, params = models()
  peft = moved(by_name['xla'], params)
  batch = packed_batch(np.random.RandomState(4))
  results = {name: jax.jit(jax.value_and_grad(functools.partial(batch_loss, model, budget=16),
                                              has_aux=True))(peft, params, batch)
             for name, model in by_name.items()}
  (loss, _), grads = results['pallas']
  (want, _), want_grads = results['xla']
  assert relative_error(loss, want) < 1e-6
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert relative_error(got, ref) < 1e-5


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake CPU) devices')
def test_a_kernel_runs_per_batch_shard_on_a_mesh():
  by_name, params = models()
  mesh = make_mesh((8, 1, 1))
  params = jax.device_put(params, replicated(mesh))
  batch = global_batch(packed_batch(np.random.RandomState(5), rows=8), mesh)
  losses, traced = {}, {}
  for name, model in by_name.items():
    settings = {m.key: method_settings(type(m), {'schedule': 'constant'}) for m in METHODS}
    optimizer = make_optimizer(list(settings), settings, 2)
    state, shardings = create_train_state(model, params, optimizer, jax.random.key(1), mesh)
    step = jit_train_step(model, optimizer, 1, mesh, RULES, shardings, replicated(mesh), 16)
    traced[name] = step.lower(state, params, batch).as_text()
    losses[name] = []
    for _ in range(2):
      state, metrics = step(state, params, batch)
      losses[name].append(float(metrics['loss']))
  np.testing.assert_allclose(losses['pallas'], losses['xla'], rtol=1e-5)
  assert 'shard_map' in traced['pallas'] or 'manual' in traced['pallas']
  assert 'shard_map' not in traced['xla']
