"""The sharded trainer on 8 CPU devices: the same numbers as one device, the base sharded as the
rules say and never changed, optimizer state only for the trainable partition."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from additive_jax.train.config import RULES
from additive_jax.train.mesh import global_batch, make_mesh
from conftest import save_tiny_hf_llama
from sharded_helpers import assert_same_trainables, batches, flat, setup, train


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tiny_sharded')
  save_tiny_hf_llama(directory, vocab_size=128, num_hidden_layers=2)
  return str(directory)


@pytest.fixture(scope='module')
def one_device(checkpoint):
  return train(checkpoint, make_mesh((1, 1, 1), devices=jax.devices()[:1]))


@pytest.fixture(scope='module')
def eight_devices(checkpoint):
  return train(checkpoint, make_mesh((2, 2, 2)), accumulation=2)


def test_eight_devices_give_the_numbers_of_one(one_device, eight_devices):
  assert jax.device_count() == 8
  np.testing.assert_allclose(eight_devices[0], one_device[0], rtol=1e-5)
  assert_same_trainables(flat(eight_devices[1].peft), flat(one_device[1].peft))


def test_base_weights_are_sharded_as_the_rules_say(eight_devices):
  *_, params, fallback = eight_devices
  assert not fallback  # every size divides: nothing replicated instead
  layers = params['layers']
  assert layers['self_attn']['q_proj']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert layers['mlp']['down_proj']['kernel'].sharding.spec == P(None, 'tensor', 'fsdp')
  assert params['embed_tokens']['embedding'].sharding.spec == P('tensor', 'fsdp')
  up = layers['mlp']['up_proj']['kernel']
  assert up.addressable_shards[0].data.shape == (2, 24, 40)  # [L, D / fsdp, F / tensor]
  # Each device holds a quarter of every matrix (fsdp × tensor): 8 devices, 4 distinct shards.
  assert len({str(shard.index) for shard in up.addressable_shards}) == 4


def test_the_frozen_base_is_bit_identical_after_training(eight_devices):
  _, _, before, after, _ = eight_devices
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)


def test_optimizer_state_is_two_moments_of_the_trainable_partition_only(eight_devices):
  state = eight_devices[1]
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(state.peft))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # scalars: step counts
  assert sum(x.nbytes for x in moments) / trainable_bytes == 2.0
  peft_shapes = sorted(x.shape for x in jax.tree.leaves(state.peft))
  assert sorted(x.shape for x in moments) == sorted(peft_shapes * 2)
  assert all(x.size == 1 for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)


def compiled_step_text(checkpoint, mesh, rules) -> str:
  step, state, params, _ = setup(checkpoint, mesh, rules=rules)
  batch = global_batch(batches(params['embed_tokens']['embedding'].shape[0])[0], mesh)
  return step.lower(state, params, batch).compile().as_text()


def test_an_fsdp_step_keeps_the_residual_stream_split_over_the_batch(checkpoint):
  """The activations' logical constraint is in the compiled step: on an fsdp-8 mesh each device
  holds its own row of the [B=8, T=16, D=48] residual stream, where the same step without the
  activation rules gathers whole batches (FSDP would then move activations, not weights)."""
  mesh = make_mesh((1, 8, 1))
  constrained = compiled_step_text(checkpoint, mesh, RULES)
  unconstrained = compiled_step_text(
      checkpoint, mesh, tuple(rule for rule in RULES if not rule[0].startswith('activation_')))
  whole, row = 'f32[8,16,48]', 'f32[1,16,48]'
  assert row in constrained and whole not in constrained
  assert whole in unconstrained
