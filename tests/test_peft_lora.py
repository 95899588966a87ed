"""LoRA against HF PEFT's LoraConfig on the same tiny random Llama (GQA: 6 heads, 2 KV heads)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from additive_jax.model.llama import Llama
from additive_jax.peft.param_count import count_leaves
from additive_jax.peft.lora import LoRA
from adapter_files_helpers import peft_model_holding
from conftest import LLAMA_3_2_1B, relative_error

ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(1).randint(0, 101, (2, 9))


def random_lora(method, config, seed=0):
  """A and B both non-zero (N(0, 0.1): (α/r)·A·B about the size of the base weights, std 0.02),
  so every target's update shows in the logits."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: method.init_leaves(jax.random.key(0), config, None))
  return jax.tree.map(lambda x: (0.1 * rng.randn(*x.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize('targets', [('q', 'v'), ALL, ('o',), ('down',)], ids='-'.join)
def test_identity_at_init(tiny_hf_llama, tokens, targets):
  _, config, params = tiny_hf_llama
  base = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))
  model = Llama(config, peft=(LoRA(4, 8, targets),))
  variables = model.init_peft(jax.random.key(0), params)
  np.testing.assert_array_equal(np.asarray(model.apply(variables, jnp.asarray(tokens))), base)


@pytest.mark.parametrize('method', [LoRA(4, 6, ALL), LoRA(2, 16)], ids=['all-r4-a6', 'qv-r2-a16'])
def test_logits_match_hf_peft(tiny_hf_llama, tokens, tmp_path, method):
  hf_model, config, params = tiny_hf_llama
  tree = random_lora(method, config)
  model = Llama(config, peft=(method,))
  ours = np.asarray(model.apply({'params': params, 'peft': {'lora': tree}}, jnp.asarray(tokens)))

  peft_model = peft_model_holding(hf_model, method, tree, config, tmp_path)  # every matrix mapped
  settings = peft_model.peft_config['default']
  assert (settings.r, settings.lora_alpha) == (method.rank, method.alpha)
  assert settings.target_modules == {f'{t}_proj' for t in method.targets}
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    base = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  assert relative_error(ref, base) > 1e-2  # the updates really act
  assert relative_error(ours, ref) <= 1e-5


def test_init_as_hf_peft(tiny_hf_llama):
  """A ~ U(±1/√I) (kaiming-uniform, a = √5) per target, B = 0."""
  _, config, params = tiny_hf_llama
  tree = LoRA(16, 32, ALL).init_leaves(jax.random.key(0), config, params)
  for target, leaves in tree.items():
    fan_in = leaves['a'].shape[1]
    a = np.asarray(leaves['a'])
    assert a.dtype == np.float32 and np.abs(a).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(a).max() > 0.9 / math.sqrt(fan_in)  # fills the interval, not a narrower one
    assert abs(a.std() * math.sqrt(3 * fan_in) - 1) < 0.05, target  # uniform: std = bound/√3
    np.testing.assert_array_equal(leaves['b'], 0)


def test_leaf_shapes(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  tree = LoRA(4, 8, ALL).init_leaves(jax.random.key(0), config, params)
  d, f, nh, kh = 48, 80, 6 * 8, 2 * 8
  expected = {'q': (d, nh), 'k': (d, kh), 'v': (d, kh), 'o': (nh, d), 'gate': (d, f), 'up': (d, f),
              'down': (f, d)}
  assert {t: (x['a'].shape, x['b'].shape) for t, x in tree.items()} == {
      t: ((3, i, 4), (3, 4, o)) for t, (i, o) in expected.items()}


def test_parameter_count():
  method = LoRA(rank=16, alpha=32, targets=ALL)
  assert method.num_params(LLAMA_3_2_1B) == 11_272_192
  assert count_leaves((method,), LLAMA_3_2_1B) == {'lora': 11_272_192}


def test_targets_list_becomes_hashable_tuple():
  method = LoRA(targets=['v', 'q'])
  assert method.targets == ('v', 'q') and hash(method)
  assert LoRA(targets=['q', 'v']).call_string() == 'LoRA()'


@pytest.mark.parametrize('kwargs, match', [
    (dict(targets=('q', 'x')), r"unknown \['x'\].*valid targets: q, k, v, o, gate, up, down"),
    (dict(targets=('q_proj',)), r"unknown \['q_proj'\]"),
    (dict(targets=()), 'targets'),
    (dict(targets=('q', 'q')), 'targets'),
    (dict(rank=0), 'rank'),
    (dict(rank=-2), 'rank'),
    (dict(rank=2.0), 'rank'),
    (dict(alpha='16'), 'alpha'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoRA(**kwargs)
