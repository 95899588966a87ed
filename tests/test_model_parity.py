"""Our Llama against transformers' LlamaForCausalLM on the same random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from additive_jax.model.config import LlamaConfig
from additive_jax.model.hf_checkpoint import load_hf_directory
from additive_jax.model.llama import Llama
from conftest import relative_error, save_tiny_hf_llama

LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
CONFIGS = {
    'gqa_untied': {},
    'mha_tied': dict(num_key_value_heads=6, tie_word_embeddings=True),
    'llama3_rope': dict(rope_parameters=LLAMA3_ROPE),
    'linear_rope': dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 1000.0, 'factor': 2.0}),
    'odd_sizes_head_dim': dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_attention_heads=5,
                               num_key_value_heads=1, head_dim=14, num_hidden_layers=2),
    'biases': dict(attention_bias=True, mlp_bias=True),
}


def compare(directory, hf_model, tokens, mask):
  config, params = load_hf_directory(str(directory))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens),
                                        attention_mask=jnp.asarray(mask)))
  valid = mask.astype(bool)  # padded positions are garbage in both; only real ones count
  return relative_error(ours[valid], ref[valid])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
  hf_model = save_tiny_hf_llama(tmp_path, **CONFIGS[name])
  vocab = hf_model.config.vocab_size
  tokens = np.random.RandomState(1).randint(0, vocab, (3, 19))
  mask = np.ones_like(tokens)
  mask[1, :6] = 0    # left padding
  mask[2, 13:] = 0   # right padding
  assert compare(tmp_path, hf_model, tokens, mask) <= 1e-5


def test_sharded_checkpoint(tmp_path):
  hf_model = save_tiny_hf_llama(tmp_path / 'one')
  hf_model.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
  assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
  tokens = np.random.RandomState(2).randint(0, 101, (2, 11))
  assert compare(tmp_path / 'sharded', hf_model, tokens, np.ones_like(tokens)) <= 1e-5


def test_transformers4_and_5_config_forms_agree(tmp_path):
  save_tiny_hf_llama(tmp_path, rope_parameters=LLAMA3_ROPE)
  v5 = json.loads((tmp_path / 'config.json').read_text())
  v4 = {k: v for k, v in v5.items() if k != 'rope_parameters'}
  v4['rope_theta'] = LLAMA3_ROPE['rope_theta']
  v4['rope_scaling'] = {'type': 'llama3', **{k: v for k, v in LLAMA3_ROPE.items()
                                            if k not in ('rope_theta', 'rope_type')}}
  assert LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v5)
  assert LlamaConfig.from_hf(v5).rope_scaling.rope_type == 'llama3'
  assert LlamaConfig.from_hf(v5).rope_theta == 500000.0


def test_base_parameter_count_matches_transformers(tmp_path):
  for name, overrides in CONFIGS.items():
    hf_model = save_tiny_hf_llama(tmp_path / name, **overrides)
    config, params = load_hf_directory(str(tmp_path / name))
    count = sum(p.numel() for p in hf_model.parameters())
    assert config.num_base_params == count == sum(np.size(x) for x in jax.tree.leaves(params)), name

