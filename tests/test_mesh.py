"""The mesh, the logical-axis rules and shard-by-shard placement on 8 CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import Llama
from additive_jax.train.config import RULES
from additive_jax.model.load import place
from additive_jax.train.mesh import make_mesh, shardings_for


def test_mesh_shapes_and_errors():
  assert jax.device_count() == 8
  assert dict(make_mesh().shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert dict(make_mesh((2, -1, 2)).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  with pytest.raises(ValueError, match=r'needs 12 devices, there are 8'):
    make_mesh((2, 3, 2))
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match='3 entries'):
    make_mesh((8,))
  for shape in ((0, -1, 1), (-1, -1, 8), (2, -2, 4)):
    with pytest.raises(ValueError, match='each entry is a positive size, or -1'):
      make_mesh(shape)


def boxed_params(config):
  return jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']


def test_rules_shard_base_weights_and_replicate_indivisible_axes():
  # SmolLM2's head counts (9 query, 3 KV heads) are not divisible by tensor=2.
  config = LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=48, num_layers=2,
                       num_heads=9, num_kv_heads=3, head_dim=4)
  mesh = make_mesh((2, 2, 2))
  shardings, replicated = shardings_for(boxed_params(config), mesh, RULES)
  attn = shardings['layers']['self_attn']
  assert attn['q_proj']['kernel'].spec == P(None, 'fsdp', None, None)
  assert shardings['layers']['mlp']['up_proj']['kernel'].spec == P(None, 'fsdp', 'tensor')
  assert shardings['embed_tokens']['embedding'].spec == P('tensor', 'fsdp')
  reported = {(path, dim) for path, dim, _, _ in replicated}
  assert ("['layers']['self_attn']['q_proj']['kernel']", 2) in reported
  assert ("['layers']['self_attn']['k_proj']['kernel']", 2) in reported


def test_place_puts_each_shard_where_the_rules_say():
  # not TINY: every size even (TINY's vocabulary is 101), so that the (2, 2, 2) mesh shards all
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)
  mesh = make_mesh((2, 2, 2))
  host = jax.tree.map(np.asarray, nn.unbox(Llama(config).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))))
  shardings, replicated = shardings_for(boxed_params(config), mesh, RULES)
  assert not replicated
  placed = place(host['params'], shardings)
  up = placed['layers']['mlp']['up_proj']['kernel']
  assert up.sharding.spec == P(None, 'fsdp', 'tensor')
  assert up.addressable_shards[0].data.shape == (2, 16, 24)  # [L, D/fsdp, F/tensor]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, placed), host['params'])
