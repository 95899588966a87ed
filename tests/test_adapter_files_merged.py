"""Merged export: (IA)³ and LoRA folded into a full HF checkpoint that transformers loads."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import additive_jax as aj
from additive_jax.model.config import LlamaConfig, RopeScaling
from additive_jax.model.convert import config_to_hf
from additive_jax.model.llama import Llama
from additive_jax.peft.files import AdapterFileError, save_merged
from adapter_files_helpers import random_peft
from conftest import TINY, relative_error

# tied embeddings, attention and MLP biases, llama3 rope: every field config_to_hf writes
CONFIG = TINY.replace(rope_theta=50000.0, rope_scaling=RopeScaling('llama3', 8.0, 1.0, 4.0, 64),
                      tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                      max_position_embeddings=256)
METHODS = (aj.peft.IA3(), aj.peft.LoRA(4, 8, ('q', 'k', 'v', 'o', 'gate', 'up', 'down')))


@pytest.fixture(scope='module')
def params():
  """Random base weights, biases and norm scales included (init leaves the biases at zero)."""
  boxed = Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.RandomState(1)
  return jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.randn(*x.shape)).astype(np.float32),
                      nn.unbox(boxed)['params'])


def test_merged_checkpoint_loads_in_transformers_with_the_unmerged_logits(params, tmp_path):
  model = Llama(CONFIG, peft=METHODS)
  variables = {'params': params, 'peft': random_peft(METHODS, CONFIG)}
  tokens = np.random.RandomState(1).randint(0, 101, (2, 9))
  ours = np.asarray(model.apply(variables, jnp.asarray(tokens)))
  save_merged(str(tmp_path), model, variables)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
  hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  base = np.asarray(Llama(CONFIG).apply({'params': params}, jnp.asarray(tokens)))
  assert relative_error(ref, base) > 1e-2  # the folded methods really act
  assert relative_error(ours, ref) <= 1e-5
  config, merged = aj.load_model(str(tmp_path))
  assert config == CONFIG
  expected = traverse_util.flatten_dict(aj.peft.merge(model, variables)[1]['params'])
  merged = traverse_util.flatten_dict(merged)
  assert merged.keys() == expected.keys()
  for name, leaf in expected.items():
    np.testing.assert_array_equal(merged[name], np.asarray(leaf), err_msg=str(name))


def test_unmergeable_methods_are_refused(params, tmp_path):
  methods = (aj.peft.Bottleneck(4), aj.peft.LoRA(2, 4))
  model = Llama(CONFIG, peft=methods)
  variables = {'params': params, 'peft': random_peft(methods, CONFIG)}
  with pytest.raises(AdapterFileError, match=r'Bottleneck\(dim=4\) cannot be folded into the base '
                                             r'weights.*Export the others with save_adapter'):
    save_merged(str(tmp_path / 'merged'), model, variables)
  assert not os.path.exists(tmp_path / 'merged')


@pytest.mark.parametrize('config', [
    CONFIG,
    CONFIG.replace(rope_scaling=RopeScaling('linear', 2.0), tie_word_embeddings=False),
    CONFIG.replace(rope_scaling=RopeScaling(), attention_bias=False, mlp_bias=False),
], ids=['llama3-tied-biases', 'linear-untied', 'default'])
def test_config_to_hf_is_the_inverse_of_from_hf(config):
  assert LlamaConfig.from_hf(config_to_hf(config)) == config
  hf = transformers.LlamaConfig.from_dict(config_to_hf(config))
  assert hf.rope_parameters['rope_type'] == config.rope_scaling.rope_type
  assert hf.rope_parameters['rope_theta'] == config.rope_theta
