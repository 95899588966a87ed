"""LLaMA-Adapter (adaption prompts) against HF PEFT's AdaptionPromptConfig: the tiny random
Llama (GQA) with padding, a head_dim apart from hidden/heads (where PEFT's GQA factor breaks),
SmolLM2-135M, PEFT's files both ways, counts, stacks and merging beside it."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import additive_jax as aj
from additive_jax.model.hf_checkpoint import load_hf_directory
from additive_jax.model.llama import Llama
from additive_jax.peft.files import load_adapter
from additive_jax.peft.registry import parse_method
from additive_jax.peft.stack import apply_mixed
from adapter_files_helpers import assert_same_leaves, peft_model_holding
from conftest import LLAMA_3_2_3B, LLAMA_3_2_3B_HF, relative_error, save_tiny_hf_llama


def random_tree(method, config, seed=0, gate_scale=1.0):
  """Prompts N(0, 1) as PEFT initializes them, gates N(0, gate_scale²): far from the zero init,
  so the adapter moves the logits well away from the base's."""
  rng = np.random.RandomState(seed)
  return {'prompt_LPD': rng.randn(method.num_layers, method.num_tokens,
                                  config.hidden_size).astype(np.float32),
          'gate_L': gate_scale * rng.randn(method.num_layers).astype(np.float32)}


def padded_batch(length=9, seed=1, vocab=101):
  """Three rows: whole, left-padded by 3, right-padded by 3."""
  tokens = np.random.RandomState(seed).randint(0, vocab, (3, length))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  mask[2, -3:] = 0
  return tokens, mask


def ours(config, params, method, tree, tokens, mask=None):
  model = Llama(config, peft=(method,))
  return np.asarray(model.apply({'params': params, 'peft': {method.key: tree}}, jnp.asarray(tokens),
                                attention_mask=None if mask is None else jnp.asarray(mask)))


def torch_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_hf_peft_with_padding_and_files_round_trip(tiny_hf_llama, tmp_path):
  """Our random trainables → our PEFT export → `PeftModel.from_pretrained`: the same logits at
  every real token of a batch with a left- and a right-padded row; PEFT's own save of that
  model reads back as the same leaves, as does our file."""
  hf_model, config, params = tiny_hf_llama
  method = aj.peft.AdaptionPrompt(num_tokens=4, num_layers=2)
  tree = random_tree(method, config)
  tokens, mask = padded_batch()
  got = ours(config, params, method, tree, tokens, mask)
  peft_model = peft_model_holding(hf_model, method, tree, config, tmp_path / 'ours')
  ref = torch_logits(peft_model, tokens, mask)
  real = mask.astype(bool)
  assert relative_error(got[real], ref[real]) <= 1e-5
  assert relative_error(ref[real], torch_logits(hf_model, tokens, mask)[real]) > 1e-2  # it acts

  assert load_adapter(str(tmp_path / 'ours'), config)[0] == (method,)
  peft_model.save_pretrained(str(tmp_path / 'peft'))
  methods, loaded = load_adapter(str(tmp_path / 'peft'), config)
  assert methods == (method,)
  assert_same_leaves(loaded, {method.key: tree})


def test_init_is_the_base_model_and_gradients_reach_both_leaves(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  method = aj.peft.AdaptionPrompt(num_tokens=3, num_layers=2)
  model = Llama(config, peft=(method,))
  variables = model.init_peft(jax.random.key(0), params)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 101, (2, 6)))
  np.testing.assert_array_equal(model.apply(variables, tokens),
                                Llama(config).apply({'params': params}, tokens))
  leaves = variables['peft'][method.key]
  assert leaves['prompt_LPD'].shape == (2, 3, 48) and not np.asarray(leaves['gate_L']).any()
  assert sum(x.size for x in jax.tree.leaves(leaves)) == method.num_params(config) == 2 * (3 * 48 + 1)
  # at the zero gate only the gate has a gradient (the paper's zero-init attention); away from it
  # both leaves have one
  grads = jax.grad(lambda t: model.apply({'params': params, 'peft': t}, tokens).sum())(
      {method.key: random_tree(method, config)})
  for name, grad in grads[method.key].items():
    assert np.abs(np.asarray(grad)).max() > 0, name


def test_a_head_dim_apart_from_hidden_over_heads(tmp_path):
  """H = 16 with D = 48 and N = 6 (D/N = 8): PEFT's GQA factor D // (K·H) = 1 is not N/K = 3,
  and its forward fails on a `view`. The reference is PEFT with that one factor corrected
  (`k_proj.in_features` set so that in_features // out_features = N/K; nn.Linear's forward
  never reads it), which is otherwise PEFT's computation."""
  hf_model = save_tiny_hf_llama(tmp_path / 'base', head_dim=16)
  config, params = load_hf_directory(str(tmp_path / 'base'))
  assert (config.head_dim, config.hidden_size // config.num_heads) == (16, 8)
  method = aj.peft.AdaptionPrompt(num_tokens=4, num_layers=2)
  tree = random_tree(method, config, seed=3)
  tokens, mask = padded_batch(seed=4)
  peft_model = peft_model_holding(hf_model, method, tree, config, tmp_path / 'adapter')
  with pytest.raises(RuntimeError, match='shape'):
    torch_logits(peft_model, tokens, mask)
  group = config.num_heads // config.num_kv_heads
  for layer in peft_model.base_model.model.model.layers[-method.num_layers:]:
    k_proj = layer.self_attn.model.k_proj
    k_proj.in_features = group * k_proj.out_features
  ref = torch_logits(peft_model, tokens, mask)
  real = mask.astype(bool)
  assert relative_error(ours(config, params, method, tree, tokens, mask)[real], ref[real]) <= 1e-5
  assert relative_error(ref[real], torch_logits(hf_model, tokens, mask)[real]) > 1e-2


def test_smollm2_matches_hf_peft(smollm2, smollm2_torch, tmp_path):
  """SmolLM2-135M (transformers' model of the embedded GGUF), the top 3 of 30 layers adapted.
  Gates N(0, 0.1²) move the logits by 29% of their range and agree to 2.9e-6, as the base alone
  does (3.0e-6); gates N(0, 1) move them by 130%, and fp32 rounding grows with that to 1.1e-5."""
  config, params = smollm2
  method = aj.peft.AdaptionPrompt(num_tokens=5, num_layers=3)
  tree = random_tree(method, config, seed=5, gate_scale=0.1)
  tokens, mask = padded_batch(length=12, seed=6, vocab=config.vocab_size)
  peft_model = peft_model_holding(smollm2_torch, method, tree, config, tmp_path)
  ref = torch_logits(peft_model, tokens, mask)
  real = mask.astype(bool)
  assert relative_error(ours(config, params, method, tree, tokens, mask)[real], ref[real]) <= 1e-5
  assert relative_error(ref[real], torch_logits(smollm2_torch, tokens, mask)[real]) > 1e-2


def test_count_llama_3_2_3b_from_formula_leaves_and_hf_peft():
  method = aj.peft.AdaptionPrompt(num_tokens=10, num_layers=28)
  abstract = nn.unbox(jax.eval_shape(Llama(LLAMA_3_2_3B).init, jax.random.key(0),
                                     jnp.zeros((1, 1), jnp.int32)))['params']
  tree = jax.eval_shape(lambda key: method.init_leaves(key, LLAMA_3_2_3B, abstract),
                        jax.random.key(0))
  leaves = sum(x.size for x in jax.tree.leaves(tree))
  assert method.num_params(LLAMA_3_2_3B) == leaves == 28 * (10 * 3072 + 1)
  assert method.token_matmul_params(LLAMA_3_2_3B) == 0
  with torch.device('meta'):
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_3_2_3B_HF))
  peft_model = peft.get_peft_model(hf_model, peft.AdaptionPromptConfig(
      task_type='CAUSAL_LM', adapter_len=10, adapter_layers=28))
  assert peft_model.get_nb_trainable_parameters()[0] == leaves


def test_stacks_of_different_depths_and_merging_a_lora_beside_it(tiny_hf_llama):
  """A stack of adapters adapting 1 and 3 layers gives each row its own logits (the shallow one
  gets zero-gated layers); LoRA on k and v merged into the base leaves the logits unchanged,
  since the prompt is projected as a token's input is."""
  _, config, params = tiny_hf_llama
  tokens = jnp.asarray(np.random.RandomState(7).randint(0, 101, (3, 7)))
  shallow, deep = aj.peft.AdaptionPrompt(4, 1), aj.peft.AdaptionPrompt(4, 3)
  adapters = [((m,), {m.key: random_tree(m, config, seed)}) for seed, m in ((8, shallow), (9, deep))]
  methods, stacked = aj.peft.stack(adapters, config)
  assert methods == (deep,)
  mixed = apply_mixed(Llama(config, peft=methods), {'params': params, 'peft': stacked},
                      jnp.asarray([1, 0, 1]), tokens)
  alone = [ours(config, params, m[0], p[m[0].key], tokens) for m, p in adapters]
  assert relative_error(alone[0], alone[1]) > 1e-2
  for row, adapter in enumerate([1, 0, 1]):
    assert relative_error(mixed[row], alone[adapter][row]) <= 1e-5
  with pytest.raises(ValueError, match=r'AdaptionPrompt\(num_tokens=4, num_layers=1\) and '
                                       r'AdaptionPrompt\(num_tokens=5, num_layers=1\) cannot share '
                                       r'a stack: a zero-padded prompt slot still takes softmax'):
    aj.peft.stack([adapters[0], ((aj.peft.AdaptionPrompt(5, 1),),
                                 {'adaption_prompt': random_tree(aj.peft.AdaptionPrompt(5, 1),
                                                                 config)})], config)

  lora = aj.peft.LoRA(rank=2, alpha=4, targets=('k', 'v'))
  model = Llama(config, peft=(lora, deep))
  variables = model.init_peft(jax.random.key(1), params)
  rng = np.random.RandomState(10)
  variables['peft'] = jax.tree.map(lambda x: x + 0.3 * rng.randn(*x.shape).astype(np.float32),
                                   variables['peft'])
  merged_model, merged = aj.peft.merge(model, variables)
  assert merged_model.peft == (deep,)
  assert relative_error(merged_model.apply(merged, tokens), model.apply(variables, tokens)) <= 1e-5


def test_bad_settings_are_named(tiny_hf_llama):
  _, config, _ = tiny_hf_llama
  for name in ('num_tokens', 'num_layers'):
    for bad in (0, -2, 1.5, True):
      with pytest.raises(ValueError, match=f'AdaptionPrompt {name} must be a positive integer'):
        aj.peft.AdaptionPrompt(**{'num_tokens': 2, 'num_layers': 2, name: bad})
  with pytest.raises(ValueError, match=r"AdaptionPrompt num_layers=4 exceeds the model's 3 layers"):
    Llama(config, peft=(aj.peft.AdaptionPrompt(10, 4),))
  method = aj.peft.AdaptionPrompt(10, 4)
  assert parse_method(method.call_string()) == method
