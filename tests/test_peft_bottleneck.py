"""Bottleneck adapters against a torch re-implementation of AdapterHub's placements.

AdapterHub (`adapters`) pins transformers 4.x and cannot be installed beside
transformers 5, so the reference is the same tiny random HF Llama with forward
hooks that add the adapter where AdapterHub's `LlamaDecoderLayerWithAdapters`
does: `attention_adapters(f, r)` and `output_adapters(f, r)` with no layer norm,
which (modeling.py `Adapter.pre_forward/forward/post_forward`) compute
  seq_bn         (original_ln_before): x = r + f + s·A(r + f)
  double_seq_bn  (residual f):         x = r + f + s·A(f), after attention and MLP
  par_bn         (ParallelAdapter):    x = r + f + s·A(r)
with AdapterHub's activations from `transformers.activations.get_activation`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.activations import get_activation

from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.param_count import count_leaves
from conftest import LLAMA_3_2_1B, relative_error

DIM = 5
PLACEMENTS = ('pfeiffer', 'houlsby', 'parallel')
ACTIVATIONS = ('relu', 'gelu', 'silu')
ADAPTERHUB_ACTIVATION = {'relu': 'relu', 'gelu': 'gelu', 'silu': 'swish'}  # its `non_linearity`


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(1).randint(0, 101, (2, 9))


@pytest.fixture(scope='module')
def base_logits(tiny_hf_llama, tokens):
  _, config, params = tiny_hf_llama
  return np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))


def random_adapters(method, config, seed=0):
  """Every leaf random (N(0, 0.3)), W_up and the biases included, so each term shows."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: method.init_leaves(jax.random.key(0), config, None))
  return jax.tree.map(lambda x: (0.3 * rng.randn(*x.shape)).astype(np.float32), shapes)


def reference_logits(hf_model, method, tree, tokens):
  """HF Llama logits with AdapterHub's adapters added by forward hooks (torch, fp32)."""
  act = get_activation(ADAPTERHUB_ACTIVATION[method.activation])
  torch_tree = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), tree)

  def adapter(site, layer, h):  # AdapterHub Adapter.forward: up(act(down(h))) * scaling
    p = {k: v[layer] for k, v in torch_tree[site].items()}
    return (act(h @ p['down'] + p['down_bias']) @ p['up'] + p['up_bias']) * method.scale

  handles, stream = [], {}
  for layer, block in enumerate(hf_model.model.layers):
    def keep_r(module, args, layer=layer):  # post_attention_layernorm reads r, the stream before the MLP
      stream[layer] = args[0]

    def after_mlp(module, args, f, layer=layer):  # the layer then adds r: x = r + returned
      r = stream[layer]
      if method.placement == 'pfeiffer':
        return f + adapter('mlp', layer, r + f)
      if method.placement == 'houlsby':
        return f + adapter('mlp', layer, f)
      return f + adapter('mlp', layer, r)

    def after_attn(module, args, output, layer=layer):
      f, *rest = output
      return (f + adapter('attn', layer, f), *rest)

    handles.append(block.post_attention_layernorm.register_forward_pre_hook(keep_r))
    handles.append(block.mlp.register_forward_hook(after_mlp))
    if method.placement == 'houlsby':
      handles.append(block.self_attn.register_forward_hook(after_attn))
  try:
    with torch.no_grad():
      return hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  finally:
    for handle in handles:
      handle.remove()


@pytest.mark.parametrize('activation', ACTIVATIONS)
@pytest.mark.parametrize('placement', PLACEMENTS)
def test_identity_at_init(tiny_hf_llama, tokens, base_logits, placement, activation):
  _, config, params = tiny_hf_llama
  model = Llama(config, peft=(Bottleneck(DIM, placement, activation, scale=2.0),))
  variables = model.init_peft(jax.random.key(0), params)
  np.testing.assert_array_equal(np.asarray(model.apply(variables, jnp.asarray(tokens))), base_logits)


@pytest.mark.parametrize('placement, activation, scale', [
    ('pfeiffer', 'relu', 1.0), ('pfeiffer', 'gelu', 0.5), ('houlsby', 'silu', 1.0),
    ('houlsby', 'relu', 2.0), ('parallel', 'relu', 4.0), ('parallel', 'gelu', 1.0)])
def test_logits_match_adapterhub_placement(tiny_hf_llama, tokens, base_logits, placement, activation,
                                           scale):
  hf_model, config, params = tiny_hf_llama
  method = Bottleneck(DIM, placement, activation, scale)
  tree = random_adapters(method, config)
  model = Llama(config, peft=(method,))
  ours = np.asarray(model.apply({'params': params, 'peft': {'bottleneck': tree}}, jnp.asarray(tokens)))
  ref = reference_logits(hf_model, method, tree, tokens)
  assert relative_error(ours, base_logits) > 1e-2  # the adapter really acts
  assert relative_error(ours, ref) <= 1e-5


def test_placements_differ(tiny_hf_llama, tokens):
  """Same leaves at different sites (reading r + f or r): far apart, beyond rounding (~1e-7)."""
  _, config, params = tiny_hf_llama
  tree = random_adapters(Bottleneck(DIM, 'pfeiffer'), config)
  logits = [np.asarray(Llama(config, peft=(Bottleneck(DIM, p),)).apply(
      {'params': params, 'peft': {'bottleneck': tree}}, jnp.asarray(tokens)))
            for p in ('pfeiffer', 'parallel')]
  assert relative_error(logits[0], logits[1]) > 1e-3


@pytest.mark.parametrize('placement', PLACEMENTS)
def test_init_as_adapterhub(tiny_hf_llama, placement):
  """W_down: N(0, 0.02) ("bert") for seq_bn/double_seq_bn, U(±1/√D) ("mam_adapter") for
  par_bn; b_down, W_up, b_up zero; fp32 leaves with a leading layers axis."""
  _, config, params = tiny_hf_llama
  tree = Bottleneck(16, placement).init_leaves(jax.random.key(0), config, params)
  assert sorted(tree) == (['attn', 'mlp'] if placement == 'houlsby' else ['mlp'])
  d = config.hidden_size
  for site in tree.values():
    assert {k: (v.shape, v.dtype) for k, v in site.items()} == {
        'down': ((3, d, 16), jnp.float32), 'down_bias': ((3, 16), jnp.float32),
        'up': ((3, 16, d), jnp.float32), 'up_bias': ((3, d), jnp.float32)}
    for name in ('down_bias', 'up', 'up_bias'):
      np.testing.assert_array_equal(site[name], 0)
    down = np.asarray(site['down'])
    if placement == 'parallel':
      assert np.abs(down).max() <= 1 / math.sqrt(d) and abs(down.std() * math.sqrt(3 * d) - 1) < 0.05
    else:
      assert abs(down.std() / 0.02 - 1) < 0.05 and abs(down.mean()) < 0.002
  if placement == 'houlsby':  # two independent adapters
    assert not np.array_equal(tree['attn']['down'], tree['mlp']['down'])


@pytest.mark.parametrize('reduction_factor, dim', [(16, 3), (5, 9), (7.5, 6), (48, 1)])
def test_reduction_factor_floors_like_adapterhub(tiny_hf_llama, reduction_factor, dim):
  _, config, params = tiny_hf_llama
  method = Bottleneck(reduction_factor=reduction_factor)
  assert method.bottleneck_dim(config) == dim == int(48 // reduction_factor)
  assert method.init_leaves(jax.random.key(0), config, params)['mlp']['down'].shape == (3, 48, dim)


@pytest.mark.parametrize('method, expected', [
    (Bottleneck(dim=64, placement='pfeiffer'), 4_228_096),
    (Bottleneck(dim=64, placement='parallel'), 4_228_096),
    (Bottleneck(dim=64, placement='houlsby'), 2 * 4_228_096),
    (Bottleneck(reduction_factor=32), 4_228_096)], ids=['pfeiffer', 'parallel', 'houlsby', 'rf32'])
def test_parameter_count(method, expected):
  assert method.num_params(LLAMA_3_2_1B) == expected
  assert count_leaves((method,), LLAMA_3_2_1B) == {'bottleneck': expected}


@pytest.mark.parametrize('kwargs, match', [
    (dict(dim=8, placement='sequential'), 'placement'),
    (dict(dim=8, activation='tanh'), 'activation'),
    (dict(dim=0), 'dim'),
    (dict(dim=-4), 'dim'),
    (dict(dim=8.0), 'dim'),
    (dict(), 'exactly one of dim and reduction_factor'),
    (dict(dim=8, reduction_factor=16), 'exactly one of dim and reduction_factor'),
    (dict(reduction_factor=0), 'reduction_factor'),
    (dict(reduction_factor=-2.0), 'reduction_factor'),
    (dict(dim=8, scale='1'), 'scale'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Bottleneck(**kwargs)


@pytest.mark.parametrize('kwargs, match', [(dict(dim=49), 'dim=49 exceeds the hidden size 48'),
                                           (dict(reduction_factor=100), 'reduction_factor=100')])
def test_too_wide_or_too_narrow_for_the_model(tiny_hf_llama, kwargs, match):
  _, config, _ = tiny_hf_llama
  with pytest.raises(ValueError, match=match):
    Llama(config, peft=(Bottleneck(**kwargs),))
