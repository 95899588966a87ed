"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import additive_jax as aj
from additive_jax.eval.decode import generate

PROMPTS = ['The quick brown fox jumps over the lazy dog.',
           'What is the capital of France? The capital of France is',
           'def square(x):\n    return x * x\n\nprint(square(12))']
TEXTS = ['Hello world', '  leading spaces,   runs\tof\t\ttabs\n\n\nand newlines ', '',
         'digits 1234567890 and 3.14159, dates 2024-11-22', 'café naïve façade 日本語 한국어 😀👍🏽 Ω≈ç√',
         "it's I'll we've they'D", '<|im_start|>user\nhi<|im_end|>\n', 'zero\u200bwidth and\u00a0nbsp',
         'CamelCaseIdentifiers snake_case_names kebab-case-words', 'a' * 80]


@pytest.fixture(scope='module')
def reference(smollm2_torch, smollm2_gguf):
  folder, name = os.path.split(smollm2_gguf)
  return smollm2_torch, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_config_and_parameter_count(smollm2):
  config, params = smollm2
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
  assert config.tie_word_embeddings and config.rope_theta == 1e5
  assert config.num_base_params == 134_515_008


def test_logits_match_transformers_gguf(smollm2, smollm2_tokenizer, reference):
  config, params = smollm2
  ref_model, _ = reference
  for prompt in PROMPTS:
    ids = np.array([smollm2_tokenizer(prompt)['input_ids']])
    with torch.no_grad():
      ref = ref_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(aj.Llama(config).apply({'params': params}, jnp.asarray(ids)))
    # 1e-4, not 1e-5: 30 layers of fp32 in two frameworks with different matmul orderings.
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4, prompt


def test_tokenizer_matches_transformers_gguf(smollm2_tokenizer, reference):
  _, ref = reference
  for text in TEXTS:
    assert smollm2_tokenizer(text)['input_ids'] == ref(text)['input_ids'], repr(text)
  chat = [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': '4.'},
          {'role': 'user', 'content': 'And 3+3?'}]
  ours = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
  theirs = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
  assert list(np.asarray(ours['input_ids'] if hasattr(ours, 'keys') else ours)) == \
      list(np.asarray(theirs['input_ids'] if hasattr(theirs, 'keys') else theirs))
  assert smollm2_tokenizer.eos_token_id == 2 and smollm2_tokenizer.pad_token_id == 2


def test_tokenizer_splits_digits_one_by_one(smollm2_tokenizer):
  """SmolLM2's pre-tokenizer ('smollm' in llama.cpp) isolates every digit."""
  ids = smollm2_tokenizer('2024', add_special_tokens=False)['input_ids']
  assert smollm2_tokenizer.convert_ids_to_tokens(ids) == ['2', '0', '2', '4']


def test_greedy_answer_capital_of_france(smollm2, smollm2_tokenizer):
  config, params = smollm2
  answers = generate(aj.Llama(config), {'params': params}, smollm2_tokenizer,
                     ['What is the capital of France?', 'Say hello.'], max_new_tokens=12)
  assert answers[0] == 'The capital of France is Paris.'
