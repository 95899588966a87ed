"""Prefix tuning against HF PEFT's PrefixTuningConfig on the same tiny random Llama (GQA)."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from additive_jax.model.llama import KVCache, Llama
from additive_jax.peft.files import save_adapter
from additive_jax.peft.prefix import PrefixTuning, vocab_ids
from additive_jax.peft.registry import parse_method
from adapter_files_helpers import peft_model_holding
from conftest import LLAMA_3_2_3B, LLAMA_3_2_3B_HF, relative_error

NUM_TOKENS, PROJECTION = 5, 16


def projected_peft_model(hf_model, method, tree, config):
  """HF PEFT's prefix tuning with its reparameterization MLP (`prefix_projection`) holding our
  values. No file holds this form (our export folds the MLP, as PEFT's save does), so the
  layout of PEFT's prompt encoder is written out here; a plain prefix goes through our export
  (`peft_model_holding`)."""
  settings = peft.PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=method.num_tokens,
                                     prefix_projection=True,
                                     encoder_hidden_size=method.projection_dim)
  peft_model = peft.get_peft_model(copy.deepcopy(hf_model), settings)
  t = {k: np.asarray(v) for k, v in tree.items()}
  n, k, h, r = method.num_tokens, config.num_kv_heads, config.head_dim, method.projection_dim
  out_weight = np.stack([t['out_k_LRKH'], t['out_v_LRKH']], axis=1)         # [L, 2, R, K, H]
  out_bias = np.stack([t['out_k_bias_LKH'], t['out_v_bias_LKH']], axis=1)   # [L, 2, K, H]
  state = {'embedding.weight': t['embedding_PKH'].reshape(n, k * h),
           'transform.0.weight': t['in_KHR'].reshape(k * h, r).T,
           'transform.0.bias': t['in_bias_R'],
           'transform.2.weight': out_weight.transpose(0, 1, 3, 4, 2).reshape(-1, r),
           'transform.2.bias': out_bias.reshape(-1)}
  peft_model.prompt_encoder['default'].load_state_dict({k: torch.tensor(v) for k, v in state.items()})
  return peft_model


def hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize('projection_dim', [None, PROJECTION])
def test_logits_match_hf_peft_with_padding(tiny_hf_llama, tmp_path, projection_dim):
  hf_model, config, params = tiny_hf_llama
  method = PrefixTuning(NUM_TOKENS, projection_dim)
  model = Llama(config, peft=(method,))
  variables = model.init_peft(jax.random.key(0), params)
  tokens = np.random.RandomState(1).randint(0, 101, (3, 9))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0   # left padding
  mask[2, 6:] = 0   # right padding
  got = np.asarray(model.apply(variables, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  tree = variables['peft']['prefix']
  peft_model = (projected_peft_model(hf_model, method, tree, config) if projection_dim else
                peft_model_holding(hf_model, method, tree, config, tmp_path))
  ref = hf_logits(peft_model, tokens, mask)
  valid = mask.astype(bool)
  assert relative_error(got[valid], ref[valid]) <= 1e-5
  base = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))
  assert np.abs(got - base).max() > 1e-2  # the prefix changes the answer: the parity is not vacuous


def test_fold_equals_projection_and_peft_export(tiny_hf_llama, tmp_path):
  """Folding evaluates the reparameterization once: same logits, L·n·2·K·H leaves, and our
  export writes the flat prefix PEFT itself saves for a `prefix_projection` adapter
  ('prompt_embeddings')."""
  hf_model, config, params = tiny_hf_llama
  method = PrefixTuning(NUM_TOKENS, PROJECTION)
  variables = Llama(config, peft=(method,)).init_peft(jax.random.key(2), params)
  folded_method, folded = method.fold(variables['peft']['prefix'], config)
  assert folded_method == PrefixTuning(NUM_TOKENS)
  assert sum(x.size for x in jax.tree.leaves(folded)) == folded_method.num_params(config)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 101, (2, 7)))
  projected = Llama(config, peft=(method,)).apply(variables, tokens)
  plain = Llama(config, peft=(folded_method,)).apply(
      {'params': params, 'peft': {'prefix': folded}}, tokens)
  assert relative_error(np.asarray(plain), np.asarray(projected)) <= 1e-6
  peft_model = projected_peft_model(hf_model, method, variables['peft']['prefix'], config)
  saved = peft.get_peft_model_state_dict(peft_model)['prompt_embeddings'].numpy()
  save_adapter(str(tmp_path), (method,), variables['peft'], config, format='hf_peft')
  exported = load_file(tmp_path / 'adapter_model.safetensors')['prompt_embeddings']
  np.testing.assert_allclose(exported, saved, rtol=0, atol=1e-6 * np.abs(saved).max())


def test_prefix_equal_to_a_real_prompts_cache_reproduces_that_prompt(tiny_hf_llama):
  """The exact effect, derived by hand: if every layer's prefix holds the keys (already rotated)
  and values that the base model caches for real tokens p at positions 0…n−1, then the prefixed
  model reading x at positions n… is the base model reading [p, x]."""
  _, config, params = tiny_hf_llama
  rng = np.random.RandomState(3)
  prompt_ids, tokens = rng.randint(0, 101, (1, NUM_TOKENS)), rng.randint(0, 101, (1, 6))
  cache = KVCache.create(config, 1, NUM_TOKENS)
  _, cache = Llama(config).apply({'params': params}, jnp.asarray(prompt_ids), cache=cache)
  tree = {'k_LPKH': cache.k_LBSKH[:, 0], 'v_LPKH': cache.v_LBSKH[:, 0]}
  got = Llama(config, peft=(PrefixTuning(NUM_TOKENS),)).apply(
      {'params': params, 'peft': {'prefix': tree}}, jnp.asarray(tokens))
  full = Llama(config).apply({'params': params}, jnp.asarray(np.concatenate([prompt_ids, tokens], 1)))
  assert relative_error(np.asarray(got), np.asarray(full)[:, NUM_TOKENS:]) <= 1e-5


def test_vocab_init_reads_every_input_after_the_sampled_words(tiny_hf_llama):
  """init='vocab' (Li & Liang's real-word activations): at init the prefixed model reading x is
  the base model reading [w, x], w the n sampled vocabulary ids."""
  _, config, params = tiny_hf_llama
  method, key = PrefixTuning(NUM_TOKENS, init='vocab'), jax.random.key(7)
  model = Llama(config, peft=(method,))
  tokens = np.random.RandomState(4).randint(0, 101, (2, 6))
  tree = method.init_leaves(key, config, params)
  got = model.apply({'params': params, 'peft': {'prefix': tree}}, jnp.asarray(tokens))
  words = np.asarray(vocab_ids(key, config, NUM_TOKENS))
  assert len(set(words[0].tolist())) > 1
  full = Llama(config).apply({'params': params},
                             jnp.asarray(np.concatenate([np.repeat(words, 2, 0), tokens], 1)))
  assert relative_error(np.asarray(got), np.asarray(full)[:, NUM_TOKENS:]) <= 1e-5
  base = Llama(config).apply({'params': params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-2  # the words do change the answer
  assert method.call_string() == "PrefixTuning(num_tokens=5, init='vocab')"
  assert parse_method(method.call_string()) == method


def test_gradients_reach_every_leaf(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  for method in (PrefixTuning(NUM_TOKENS), PrefixTuning(NUM_TOKENS, PROJECTION)):
    model = Llama(config, peft=(method,))
    variables = model.init_peft(jax.random.key(0), params)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 101, (2, 5)))
    grads = jax.grad(lambda tree: model.apply({'params': params, 'peft': tree}, tokens).sum())(
        variables['peft'])
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
      assert np.abs(np.asarray(grad)).max() > 0, (method, path)


def test_count_llama_3_2_3b_from_formula_leaves_and_hf_peft():
  method = PrefixTuning(200)
  abstract = nn.unbox(jax.eval_shape(Llama(LLAMA_3_2_3B).init, jax.random.key(0),
                                     jnp.zeros((1, 1), jnp.int32)))['params']
  tree = jax.eval_shape(lambda key, p: Llama(LLAMA_3_2_3B, peft=(method,)).init_peft(key, p)['peft'],
                        jax.random.key(0), abstract)
  leaves = sum(x.size for x in jax.tree.leaves(tree))
  assert method.num_params(LLAMA_3_2_3B) == leaves == 11_468_800
  with torch.device('meta'):
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_3_2_3B_HF))
  peft_model = peft.get_peft_model(hf_model, peft.PrefixTuningConfig(task_type='CAUSAL_LM',
                                                                     num_virtual_tokens=200))
  assert peft_model.get_nb_trainable_parameters()[0] == 11_468_800


def test_count_with_projection_matches_hf_peft(tiny_hf_llama):
  hf_model, config, params = tiny_hf_llama
  method = PrefixTuning(NUM_TOKENS, PROJECTION)
  leaves = sum(x.size for x in jax.tree.leaves(method.init_leaves(jax.random.key(0), config, params)))
  peft_model = projected_peft_model(hf_model, method,
                                    method.init_leaves(jax.random.key(0), config, params), config)
  assert method.num_params(config) == leaves == peft_model.get_nb_trainable_parameters()[0]


def test_errors(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match='num_tokens must be a positive integer'):
      PrefixTuning(bad)
  with pytest.raises(ValueError, match='projection_dim must be a positive integer'):
    PrefixTuning(4, projection_dim=0)
  with pytest.raises(ValueError, match="init must be one of \\('random', 'vocab'\\), got 'text'"):
    PrefixTuning(4, init='text')
  with pytest.raises(ValueError, match="init='vocab'.*projection_dim"):
    PrefixTuning(4, projection_dim=8, init='vocab')
  small = config.replace(max_position_embeddings=10)
  with pytest.raises(ValueError, match='leaves no position'):
    Llama(small, peft=(PrefixTuning(10),))
  model = Llama(small, peft=(PrefixTuning(NUM_TOKENS),))
  variables = model.init_peft(jax.random.key(0), params)
  assert model.apply(variables, jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 101)  # 5 + 5 = 10
  with pytest.raises(ValueError, match=r'6 tokens \+ 0 prompt vectors \+ 5 prefix positions need 11'):
    model.apply(variables, jnp.zeros((1, 6), jnp.int32))
