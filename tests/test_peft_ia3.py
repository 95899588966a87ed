"""(IA)³ against HF PEFT's IA3Config on the same tiny random Llama (GQA, with biases)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from additive_jax.model.hf_checkpoint import load_hf_directory
from additive_jax.model.llama import Llama
from additive_jax.peft.param_count import count_leaves
from additive_jax.peft.ia3 import IA3
from adapter_files_helpers import peft_model_holding
from conftest import LLAMA_3_2_1B, LLAMA_3_2_3B, relative_error, save_tiny_hf_llama


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(HF model, our config, our params): 6 query heads, 2 KV heads, q/k/v/o and MLP biases."""
  directory = tmp_path_factory.mktemp('tiny_llama')
  hf_model = save_tiny_hf_llama(directory, attention_bias=True, mlp_bias=True)
  with torch.no_grad():  # transformers zero-initializes biases; random ones make them count
    for name, weight in hf_model.named_parameters():
      if name.endswith('.bias'):
        weight.normal_(0.0, 0.1)
  hf_model.save_pretrained(directory)
  config, params = load_hf_directory(str(directory))
  return hf_model, config, params


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(1).randint(0, 101, (2, 9))


def random_ia3(config, seed=0):
  """Vectors far from one (U(0.5, 1.5)) so that every channel's scaling shows in the logits."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: IA3().init_leaves(jax.random.key(0), config, None))
  return jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)


def test_identity_at_init(tiny, tokens):
  _, config, params = tiny
  base = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))
  model = Llama(config, peft=(IA3(),))
  variables = model.init_peft(jax.random.key(0), params)
  np.testing.assert_array_equal(np.asarray(model.apply(variables, jnp.asarray(tokens))), base)


def test_logits_match_hf_peft(tiny, tokens, tmp_path):
  hf_model, config, params = tiny
  tree = random_ia3(config)
  model = Llama(config, peft=(IA3(),))
  ours = np.asarray(model.apply({'params': params, 'peft': {'ia3': tree}}, jnp.asarray(tokens)))

  peft_model = peft_model_holding(hf_model, IA3(), tree, config, tmp_path)
  # every vector of PEFT's own (IA)³ for Llama (its default targets) is mapped
  default = peft.get_peft_model(copy.deepcopy(hf_model), peft.IA3Config(task_type='CAUSAL_LM'))
  names = lambda model: set(peft.get_peft_model_state_dict(model))
  assert names(peft_model) == names(default)
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    base = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  assert relative_error(ref, base) > 1e-2  # the vectors really act
  assert relative_error(ours, ref) <= 1e-5


def test_merge_folds_biases(tiny, tokens):
  """With attention_bias, y = l ⊙ (W x + b): merging must scale the k/v biases too."""
  from additive_jax.peft.merge import merge
  _, config, params = tiny
  model = Llama(config, peft=(IA3(),))
  variables = {'params': params, 'peft': {'ia3': random_ia3(config)}}
  merged_model, merged = merge(model, variables)
  for name in ('k_proj', 'v_proj'):
    assert not np.array_equal(merged['params']['layers']['self_attn'][name]['bias'],
                              params['layers']['self_attn'][name]['bias'])
  np.testing.assert_array_equal(merged['params']['layers']['mlp']['down_proj']['bias'],
                                params['layers']['mlp']['down_proj']['bias'])  # added after W(l ⊙ h)
  ours = np.asarray(merged_model.apply(merged, jnp.asarray(tokens)))
  ref = np.asarray(model.apply(variables, jnp.asarray(tokens)))
  assert relative_error(ours, ref) <= 1e-5


def test_unmerge_refuses_zero_entries(tiny):
  _, config, params = tiny
  tree = random_ia3(config)
  tree['l_v'][1, 3] = 0.0
  with pytest.raises(ValueError, match='l_v'):
    IA3().unmerge(tree, IA3().merge(tree, params, config), config)


@pytest.mark.parametrize('config, expected', [(LLAMA_3_2_1B, 147_456), (LLAMA_3_2_3B, 286_720)],
                         ids=['llama-3.2-1b', 'llama-3.2-3b'])
def test_parameter_count(config, expected):
  assert IA3().num_params(config) == expected
  assert count_leaves((IA3(),), config) == {'ia3': expected}


def test_leaves_are_fp32_with_layers_axis(tiny):
  _, config, params = tiny
  tree = IA3().init_leaves(jax.random.key(0), config, params)
  kh = config.num_kv_heads * config.head_dim
  assert {k: (v.shape, v.dtype) for k, v in tree.items()} == {
      'l_k': ((3, kh), jnp.float32), 'l_v': ((3, kh), jnp.float32),
      'l_ff': ((3, config.intermediate_size), jnp.float32)}
