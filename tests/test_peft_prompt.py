"""Prompt tuning against HF PEFT's PromptTuningConfig on the same tiny random Llama."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from additive_jax.model.llama import Llama
from additive_jax.peft.prompt import PromptTuning
from adapter_files_helpers import peft_model_holding
from conftest import relative_error

NUM_TOKENS = 4


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """A word-level tokenizer over the tiny vocab ('w0' … 'w100') that prepends BOS 'w1'."""
  tok = Tokenizer(models.WordLevel(vocab={f'w{i}': i for i in range(101)}, unk_token='w0'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single='w1 $A', special_tokens=[('w1', 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='w1', unk_token='w0')
  directory = tmp_path_factory.mktemp('tokenizer')
  fast.save_pretrained(directory)
  return str(directory)


def ours(config, variables, tokens, mask=None, method=None):
  model = Llama(config, peft=(method or PromptTuning(NUM_TOKENS),))
  kwargs = {} if mask is None else {'attention_mask': jnp.asarray(mask)}
  return np.asarray(model.apply(variables, jnp.asarray(tokens), **kwargs))


def peft_logits(peft_model, tokens, mask):
  with torch.no_grad():
    out = peft_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  return out.numpy()[:, NUM_TOKENS:]  # PEFT returns the virtual positions too


def test_logits_match_hf_peft_with_padding(tiny_hf_llama, tmp_path):
  hf_model, config, params = tiny_hf_llama
  method = PromptTuning(NUM_TOKENS)
  variables = Llama(config, peft=(method,)).init_peft(jax.random.key(0), params)
  tokens = np.random.RandomState(1).randint(0, 101, (3, 9))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0   # left padding
  mask[2, 6:] = 0   # right padding
  got = ours(config, variables, tokens, mask)
  peft_model = peft_model_holding(hf_model, method, variables['peft']['prompt'], config, tmp_path)
  ref = peft_logits(peft_model, tokens, mask)
  assert got.shape == (3, 9, 101)
  valid = mask.astype(bool)
  assert relative_error(got[valid], ref[valid]) <= 1e-5
  base = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))
  assert np.abs(got - base).max() > 1e-2  # the prompt changes the answer: the parity is not vacuous


def test_soft_prompt_of_token_embeddings_equals_that_hard_prompt(tiny_hf_llama):
  """The exact effect, derived by hand: prompt rows = embeddings of ids p make the model read
  [p, x] with x at positions n…, so its logits are the base logits of [p, x] on the x positions."""
  _, config, params = tiny_hf_llama
  prompt_ids = np.array([5, 17, 17, 42])
  tree = {'prompt_PD': jnp.asarray(params['embed_tokens']['embedding'][prompt_ids])}
  tokens = np.random.RandomState(2).randint(0, 101, (2, 7))
  got = ours(config, {'params': params, 'peft': {'prompt': tree}}, tokens)
  hard = np.concatenate([np.broadcast_to(prompt_ids, (2, NUM_TOKENS)), tokens], axis=1)
  ref = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(hard)))[:, NUM_TOKENS:]
  assert relative_error(got, ref) <= 1e-6


def test_packed_segments_each_see_the_prompt_as_if_alone(tiny_hf_llama):
  """The train step always passes segment ids; every packed segment gets the prompt."""
  _, config, params = tiny_hf_llama
  variables = Llama(config, peft=(PromptTuning(NUM_TOKENS),)).init_peft(jax.random.key(3), params)
  rng = np.random.RandomState(3)
  first, second = rng.randint(0, 101, 6), rng.randint(0, 101, 4)
  model = Llama(config, peft=(PromptTuning(NUM_TOKENS),))
  packed = model.apply(variables, jnp.asarray(np.concatenate([first, second])[None]),
                       positions=jnp.asarray([list(range(6)) + list(range(4))]),
                       segment_ids=jnp.asarray([[1] * 6 + [2] * 4]))
  alone = [ours(config, variables, seq[None]) for seq in (first, second)]
  assert relative_error(np.asarray(packed)[0, :6], alone[0][0]) <= 1e-5
  assert relative_error(np.asarray(packed)[0, 6:], alone[1][0]) <= 1e-5


@pytest.mark.parametrize('text', ['w5 w7 w9', 'w3 w4 w5 w6 w7 w8 w9'])  # repeated / truncated
def test_text_init_matches_hf_peft(tiny_hf_llama, tokenizer_dir, text):
  hf_model, config, params = tiny_hf_llama
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  method = PromptTuning(NUM_TOKENS + 2, init='text', text=text)
  tree = Llama(config, peft=(method,)).init_peft(jax.random.key(0), params, tokenizer=tokenizer)
  peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.PromptTuningConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=NUM_TOKENS + 2, prompt_tuning_init='TEXT',
      prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_dir))
  ref = peft.get_peft_model_state_dict(peft_model)['prompt_embeddings'].numpy()
  np.testing.assert_array_equal(np.asarray(tree['peft']['prompt']['prompt_PD']), ref)
  ids = tokenizer(text)['input_ids']  # BOS included, as PEFT does
  expected = (ids * 6)[:NUM_TOKENS + 2]
  np.testing.assert_array_equal(np.asarray(tree['peft']['prompt']['prompt_PD']),
                                params['embed_tokens']['embedding'][expected])


def test_vocab_init_samples_rows_of_the_embedding_table(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  table = params['embed_tokens']['embedding']
  prompts = [np.asarray(PromptTuning(NUM_TOKENS).init_leaves(jax.random.key(seed), config, params)['prompt_PD'])
             for seed in (0, 1)]
  for prompt in prompts:
    assert prompt.dtype == np.float32 and prompt.shape == (NUM_TOKENS, config.hidden_size)
    assert all((table == row).all(axis=1).any() for row in prompt)
  assert not np.array_equal(prompts[0], prompts[1])


def test_gradient_reaches_every_prompt_row(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  model = Llama(config, peft=(PromptTuning(NUM_TOKENS),))
  variables = model.init_peft(jax.random.key(0), params)
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 101, (2, 5)))
  grads = jax.grad(lambda peft_tree: model.apply({'params': params, 'peft': peft_tree}, tokens).sum())(
      variables['peft'])
  assert (np.abs(np.asarray(grads['prompt']['prompt_PD'])).max(axis=1) > 0).all()


def test_parameter_count(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  method = PromptTuning(NUM_TOKENS)
  leaves = jax.tree.leaves(method.init_leaves(jax.random.key(0), config, params))
  assert method.num_params(config) == sum(x.size for x in leaves) == NUM_TOKENS * 48


def test_call_string_rebuilds_the_method():
  method = PromptTuning(8, init='text', text='Classify:')
  assert method.call_string() == "PromptTuning(num_tokens=8, init='text', text='Classify:')"
  assert PromptTuning(8).call_string() == 'PromptTuning(num_tokens=8)'
  assert PromptTuning(8, init='text', text='Classify:') == method


def test_argument_errors(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  for bad in (0, -3, 2.0):
    with pytest.raises(ValueError, match='num_tokens must be a positive integer'):
      PromptTuning(bad)
  with pytest.raises(ValueError, match="init='text'.* needs text"):
    PromptTuning(4, init='text')
  with pytest.raises(ValueError, match='init must be one of'):
    PromptTuning(4, init='random')
  with pytest.raises(ValueError, match='needs the tokenizer'):
    Llama(config, peft=(PromptTuning(4, init='text', text='w3'),)).init_peft(jax.random.key(0), params)


def test_prompt_longer_than_the_context_is_refused(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  small = config.replace(max_position_embeddings=12)
  with pytest.raises(ValueError, match='leaves no position'):
    Llama(small, peft=(PromptTuning(12),))
  variables = Llama(small, peft=(PromptTuning(NUM_TOKENS),)).init_peft(jax.random.key(0), params)
  fits = ours(small, variables, np.zeros((1, 8), np.int32))  # 4 + 8 = 12 positions: fits exactly
  assert fits.shape == (1, 8, 101)
  with pytest.raises(ValueError, match=r'9 tokens \+ 4 prompt vectors \+ 0 prefix positions need 13 '
                                       r'positions; the model has max_position_embeddings=12'):
    ours(small, variables, np.zeros((1, 9), np.int32))
