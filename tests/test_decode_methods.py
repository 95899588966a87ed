"""Decoding with a KV cache under each method: the logits of the full forward pass, or a clear
refusal where a method cannot decode with a cache yet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import KVCache, Llama
from additive_jax.peft.merge import inference_form
from conftest import relative_error

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rope_theta=1000.0)
DECODING = {
    'houlsby': aj.peft.Bottleneck(dim=4, placement='houlsby'),
    'ia3': aj.peft.IA3(),
    'lora': aj.peft.LoRA(rank=2, alpha=4, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down')),
    'prefix': aj.peft.PrefixTuning(num_tokens=3),
    'prefix_projection': aj.peft.PrefixTuning(num_tokens=3, projection_dim=5),
}


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']


def random_variables(method, params):
  """Every leaf random (N(0, 0.3), (IA)³ around one), so each method's effect shows."""
  model = Llama(CONFIG, peft=(method,))
  peft = model.init_peft(jax.random.key(1), params)['peft']
  rng = np.random.RandomState(2)
  peft = jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rng.randn(*x.shape), jnp.float32), peft)
  return model, {'params': params, 'peft': peft}


def decode(model, variables, tokens, prompt_length):
  """Logits of the prompt in one call, then of each later token one call at a time."""
  cache = KVCache.create(CONFIG, tokens.shape[0], tokens.shape[1])
  logits, cache = model.apply(variables, tokens[:, :prompt_length], cache=cache)
  steps = [logits]
  for t in range(prompt_length, tokens.shape[1]):
    logits, cache = model.apply(variables, tokens[:, t:t + 1], cache=cache)
    steps.append(logits)
  return np.asarray(jnp.concatenate(steps, axis=1))


@pytest.mark.parametrize('name', list(DECODING))
def test_cached_decoding_equals_the_full_forward_pass(params, name):
  model, variables = random_variables(DECODING[name], params)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, 61, (2, 9)))
  full = np.asarray(model.apply(variables, tokens))
  assert relative_error(full, np.asarray(Llama(CONFIG).apply({'params': params}, tokens))) > 1e-2
  assert relative_error(decode(model, variables, tokens, prompt_length=5), full) <= 1e-5


def test_the_inference_form_of_a_reparameterized_prefix_gives_the_same_logits(params):
  model, variables = random_variables(DECODING['prefix_projection'], params)
  folded_model, folded = inference_form(model, variables)
  assert folded_model.peft == (aj.peft.PrefixTuning(num_tokens=3),)
  assert set(folded['peft']['prefix']) == {'k_LPKH', 'v_LPKH'}
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 61, (2, 7)))
  assert relative_error(np.asarray(folded_model.apply(folded, tokens)),
                        np.asarray(model.apply(variables, tokens))) <= 1e-6


@pytest.mark.parametrize('method, message', [
    (aj.peft.PromptTuning(num_tokens=3), r'PromptTuning\(num_tokens=3\) cannot decode with a KV cache'),
    (aj.peft.LadderSide(reduction=2), r'LadderSide\(reduction=2\) cannot decode with a KV cache'),
])
def test_methods_without_a_cache_refuse_one(params, method, message):
  model, variables = random_variables(method, params)
  cache = KVCache.create(CONFIG, 1, 8)
  with pytest.raises(NotImplementedError, match=message):
    model.apply(variables, jnp.zeros((1, 4), jnp.int32), cache=cache)
