"""Ladder side tuning: identity at init, gradients only on the side, no backward through the backbone."""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from additive_jax.model.config import LlamaConfig, RopeScaling
from additive_jax.model.llama import KVCache, Llama
from additive_jax.model.rope import rotary_tables
from additive_jax.peft.base import Method
from additive_jax.peft.ladder import LadderSide, keep_indices
from conftest import LLAMA_3_2_3B, TINY

# TINY's backbone-internal sizes are unique: F = 80 and H = 8 appear nowhere else (side: R = 24,
# F/r = 40, H/r = 4; here B = 2, T = 5).
CONFIG = TINY
LADDER = LadderSide(reduction=2)


@dataclasses.dataclass(frozen=True)
class HiddenScale(Method):
  """A stand-in for (IA)³'s l_ff: scales the MLP hidden activation, inside the backbone."""
  key: ClassVar[str] = 'hidden_scale'

  def init_leaves(self, rng, config, params, tokenizer=None):
    return {'scale_LF': jnp.ones((config.num_layers, config.intermediate_size))}

  def mlp_hidden(self, p, h):
    return h * p['scale_LF']


def abstract_params(config):
  return nn.unbox(jax.eval_shape(Llama(config).init, jax.random.key(0),
                                 jnp.zeros((1, 1), jnp.int32)))['params']


def layer_shapes(config):
  return abstract_params(config)['layers']


@pytest.fixture(scope='module')
def params():
  return nn.unbox(jax.jit(Llama(CONFIG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.RandomState(1).randint(0, 101, (2, 5)))


def loss_fn(model, params, tokens):
  """A cross-entropy of the logits (targets: the tokens themselves) as a function of the 'peft' tree."""
  def loss(peft_tree):
    logits_BTV = model.apply({'params': params, 'peft': peft_tree}, tokens)
    target_BT = jnp.take_along_axis(logits_BTV, tokens[..., None], -1)[..., 0]
    return (jax.nn.logsumexp(logits_BTV, -1) - target_BT).mean()
  return loss


def test_identity_at_init(params, tokens):
  model = Llama(CONFIG, peft=(LADDER,))
  variables = model.init_peft(jax.random.key(0), params)
  base = jax.jit(Llama(CONFIG).apply)({'params': params}, tokens)
  np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(variables, tokens)), np.asarray(base))


def test_gradients_reach_every_side_leaf_and_no_backbone_weight(params, tokens):
  """At init W_up = 0 blocks every gradient but its own (as LoRA's B = 0), so W_up is perturbed.
  The LM head reads the joined state after the ladder, so it alone of the base weights would get
  a gradient; the backbone (embeddings, blocks, final norm) gets exactly zero."""
  model = Llama(CONFIG, peft=(LADDER,))
  tree = model.init_peft(jax.random.key(0), params)['peft']
  tree['ladder']['up_RD'] = 0.1 * jax.random.normal(jax.random.key(5), tree['ladder']['up_RD'].shape)
  tree['ladder']['gate_L'] = jnp.array([0.3, -0.2, 0.1])
  grads_params, grads_peft = jax.grad(lambda p, t: loss_fn(model, p, tokens)(t), argnums=(0, 1))(
      params, tree)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads_peft):
    assert np.abs(np.asarray(grad)).max() > 0, path
  for path, grad in jax.tree_util.tree_leaves_with_path(grads_params):
    if path[0].key == 'lm_head':
      assert np.abs(np.asarray(grad)).max() > 0
    else:
      assert not np.asarray(grad).any(), path


def residual_shapes(model, params, tokens):
  """Shapes of the residuals the backward pass of the loss w.r.t. variables['peft'] keeps."""
  tree = model.init_peft(jax.random.key(0), params)['peft']
  _, backward = jax.vjp(loss_fn(model, params, tokens), tree)
  return [tuple(x.shape) for x in jax.tree.leaves(backward)]  # a Partial: its leaves are residuals


def backbone_internals(shapes):
  """Residuals only a backward through the backbone keeps: anything of the backbone's d_ff (80)
  or head dim (8) wide, e.g. the MLP activations [L,B,T,F], q/k/v [L,B,T,N,H], its weights."""
  f, h = CONFIG.intermediate_size, CONFIG.head_dim
  return [s for s in shapes if f in s or s[-1] == h]


def test_backward_never_enters_the_backbone(params, tokens):
  b, t = tokens.shape
  l, d, v = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.vocab_size
  r = d // LADDER.reduction
  shapes = residual_shapes(Llama(CONFIG, peft=(LADDER,)), params, tokens)
  assert backbone_internals(shapes) == []
  # Of the backbone's width D, exactly the taps are kept (each layer's output and the embeddings,
  # which feed the down-projections), the LM head kernel and the side's W_up (the backward from
  # the logits goes through both).
  assert sorted(s for s in shapes if d in s) == sorted([(l, b, t, d), (b, t, d), (d, v), (r, d)])
  # The detector can fail: with a method inside the backbone, its internals are kept.
  control = residual_shapes(Llama(CONFIG, peft=(HiddenScale(),)), params, tokens)
  assert (l, b, t, CONFIG.intermediate_size) in backbone_internals(control)


def test_pruning_keeps_the_largest_l1_channels():
  """Hand-made weights, 1e-3 everywhere except chosen entries, so the choice is known by hand.

  D = 8, F = 12, H = 8, reduction 4: keep 2 hidden channels, 3 MLP units per layer, head dims 2.
  """
  # its own sizes, not TINY's: the hand-made weights below are laid out for them
  cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8)
  layers = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3), layer_shapes(cfg))
  attn, mlp = layers['self_attn'], layers['mlp']
  # Hidden channels (L1 over all kernels and layers, above the uniform baseline):
  #   1: its o column in layer 1 (16 entries) and down column in layer 0 (12 entries) = 1 -> +28
  #   6: its q row in layer 0 (16 entries) = 1 -> +16
  #   4: its k row in layer 0 (8 entries) = 1 -> +8;   3: its up row in layer 1 (12) = 0.5 -> +6
  attn['o_proj']['kernel'] = attn['o_proj']['kernel'].at[1, :, :, 1].set(1.0)
  mlp['down_proj']['kernel'] = mlp['down_proj']['kernel'].at[0, :, 1].set(1.0)
  attn['q_proj']['kernel'] = attn['q_proj']['kernel'].at[0, 6].set(1.0)
  attn['k_proj']['kernel'] = attn['k_proj']['kernel'].at[0, 4].set(1.0)
  mlp['up_proj']['kernel'] = mlp['up_proj']['kernel'].at[1, 3].set(0.5)
  # MLP units, per layer (gate and up columns, down row; the edits above add the same to every
  # unit of a layer). Layer 0: unit 7 (up column = 3) > 5 (gate = 2) > 2 (gate = 1) > 11 (down
  # row = 0.5). Layer 1: gate columns 0, 1, 8, 9 = 4, 1, 3, 2.
  mlp['up_proj']['kernel'] = mlp['up_proj']['kernel'].at[0, :, 7].set(3.0)
  mlp['gate_proj']['kernel'] = mlp['gate_proj']['kernel'].at[0, :, 5].set(2.0)
  mlp['gate_proj']['kernel'] = mlp['gate_proj']['kernel'].at[0, :, 2].set(1.0)
  mlp['down_proj']['kernel'] = mlp['down_proj']['kernel'].at[0, 11].set(0.5)
  for unit, value in zip([0, 1, 8, 9], [4.0, 1.0, 3.0, 2.0]):
    mlp['gate_proj']['kernel'] = mlp['gate_proj']['kernel'].at[1, :, unit].set(value)
  hidden, units, head = keep_indices(layers, cfg, reduction=4)
  np.testing.assert_array_equal(hidden, [1, 6])
  np.testing.assert_array_equal(units, [[2, 5, 7], [0, 8, 9]])
  np.testing.assert_array_equal(head, [0, 4])  # rotary pairs (j, j + H/2) for j = 0, r, …: (0, 4)


def test_pruned_blocks_are_slices_of_the_backbone(params):
  hidden, units, head = keep_indices(params['layers'], CONFIG, LADDER.reduction)
  blocks = LADDER.init_leaves(jax.random.key(0), CONFIG, params)['blocks']
  q = np.asarray(params['layers']['self_attn']['q_proj']['kernel'])
  np.testing.assert_array_equal(blocks['self_attn']['q_proj']['kernel'],
                                q[:, np.asarray(hidden)][..., np.asarray(head)])
  down = np.asarray(params['layers']['mlp']['down_proj']['kernel'])
  for layer in range(CONFIG.num_layers):
    np.testing.assert_array_equal(blocks['mlp']['down_proj']['kernel'][layer],
                                  down[layer][np.asarray(units[layer])][:, np.asarray(hidden)])


@pytest.mark.parametrize('rope', [RopeScaling(), RopeScaling('llama3', 8.0, 1.0, 4.0, 16)])
def test_side_rotary_tables_are_the_backbones_on_the_kept_dims(rope):
  cfg = CONFIG.replace(head_dim=16, rope_scaling=rope)
  positions = jnp.arange(40)[None]
  layers = jax.tree.map(lambda x: jnp.ones(x.shape), layer_shapes(cfg))
  _, _, head = keep_indices(layers, cfg, LADDER.reduction)
  side_tables = rotary_tables(positions, LADDER.side_config(cfg))
  for side, full in zip(side_tables, rotary_tables(positions, cfg)):
    np.testing.assert_allclose(side, full[..., np.asarray(head)], rtol=0, atol=1e-6)


def test_refuses_methods_inside_the_backbone():
  with pytest.raises(ValueError, match='stop_gradient.*HiddenScale'):
    Llama(CONFIG, peft=(LADDER, HiddenScale()))


def test_a_cache_without_the_side_networks_state_is_refused(params, tokens):
  model = Llama(CONFIG, peft=(LADDER,))
  variables = model.init_peft(jax.random.key(0), params)
  with pytest.raises(ValueError, match='LadderSide decodes with its own cache of the side network'):
    model.apply(variables, tokens, cache=KVCache.create(CONFIG, 2, 8))


def test_argument_errors():
  for bad in (0, -2, 2.0):
    with pytest.raises(ValueError, match='reduction must be a positive integer'):
      LadderSide(bad)
  with pytest.raises(ValueError, match='hidden_size=48 is not a multiple'):
    Llama(CONFIG, peft=(LadderSide(5),))
  with pytest.raises(ValueError, match='intermediate_size=80 is not a multiple'):
    Llama(CONFIG, peft=(LadderSide(3),))
  with pytest.raises(ValueError, match='head_dim=8 is not a multiple of twice'):
    Llama(CONFIG.replace(hidden_size=64, intermediate_size=128), peft=(LadderSide(8),))


@pytest.mark.parametrize('config', [CONFIG, CONFIG.replace(attention_bias=True, mlp_bias=True),
                                    LLAMA_3_2_3B], ids=['tiny', 'tiny_biases', 'llama_3_2_3b'])
def test_parameter_count_formula_equals_leaves(config):
  method = LadderSide(2 if config is not LLAMA_3_2_3B else 8)
  tree = jax.eval_shape(lambda key, p: method.init_leaves(key, config, p), jax.random.key(0),
                        abstract_params(config))
  assert method.num_params(config) == sum(x.size for x in jax.tree.leaves(tree))
