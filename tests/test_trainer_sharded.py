"""The sharded trainer on 8 CPU devices: the same numbers as one device, the base sharded as the
rules say and never changed, optimizer state only for the trainable partition."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.train.config import RULES
from additive_jax.train.mesh import global_batch
from additive_jax.train.mesh import make_mesh
from additive_jax.train.model_state import create_train_state, load_base
from additive_jax.train.optimizer import make_optimizer, method_settings
from additive_jax.train.step import jit_train_step
from conftest import save_tiny_hf_llama

# Sizes every mesh axis divides: vocab 128, D 48, F 80, 6 query and 2 KV heads.
METHODS = (Bottleneck(dim=8, placement='houlsby'), IA3(), LoRA(rank=4, alpha=8, targets=('q', 'v', 'down')),
           PrefixTuning(num_tokens=3))
STEPS = 3


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tiny_sharded')
  save_tiny_hf_llama(directory, vocab_size=128, num_hidden_layers=2)
  return str(directory)


def batches(vocab, rows=8, length=16):
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    tokens = rng.randint(0, vocab, (rows, length + 1)).astype(np.int32)
    out.append({'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
                'loss_mask': (rng.rand(rows, length) < 0.7).astype(np.float32),
                'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                'segment_ids': np.ones((rows, length), np.int32)})
  return out


def train(checkpoint, mesh, accumulation=1, local_rows=slice(None)):
  """(losses, final state, params before, params after, the fallback report) of STEPS steps;
  this process feeds `local_rows` of each global batch (all of them with one process)."""
  config, params, param_shardings, fallback = load_base(checkpoint, mesh, RULES)
  model = Llama(config, peft=METHODS)
  settings = {m.key: method_settings(m.key, {'schedule': 'constant'}) for m in METHODS}
  optimizer = make_optimizer(list(settings), settings, STEPS)
  state, state_shardings = create_train_state(model, params, optimizer, jax.random.key(0), mesh)
  before = jax.tree.map(np.asarray, params)
  step = jit_train_step(model, optimizer, accumulation, mesh, state_shardings, param_shardings)
  losses = []
  for batch in batches(config.vocab_size):
    local = {name: rows[local_rows] for name, rows in batch.items()}
    state, metrics = step(state, params, global_batch(local, mesh))
    losses.append(float(metrics['loss']))
  return losses, state, before, params, fallback


def flat(peft):
  """{'['method']['leaf']...': array} of a 'peft' tree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(peft)}


def assert_same_trainables(ours, ref):
  """Each method's values, max|ours − ref| / max|ref| ≤ 1e-5 over its subtree. (Per leaf is too
  strict for Adam: a zero-initialized leaf holds only updates, and where a gradient is near
  Adam's ε (a dead relu unit), m / (√v + ε) turns fp32 reduction-order differences into ~1e-5
  of the learning rate.)"""
  assert sorted(ours) == sorted(ref)
  for method in {path.split(']')[0] for path in ref}:
    paths = [path for path in ref if path.startswith(method + ']')]
    ours_values = np.concatenate([np.ravel(ours[path]) for path in paths])
    ref_values = np.concatenate([np.ravel(ref[path]) for path in paths])
    assert np.abs(ours_values - ref_values).max() <= 1e-5 * np.abs(ref_values).max(), method


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
