"""Scoring and decoding against references outside our code: label words of several tokens
scored as transformers scores them, and greedy decoding of plain (not chat) prompts equal to
repeated argmax of full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import additive_jax as aj
from additive_jax.eval.classify import choice_logprobs
from additive_jax.eval.decode import generate
from additive_jax.model.llama import Llama
from conftest import relative_error

PROMPTS = [[5, 9, 11], [7, 3, 2, 8, 1, 60], [40]]


def transformers_scores(hf_model, prompts, choices) -> np.ndarray:
  """sum_t log p(choice_t | prompt, choice_<t), each (prompt, choice) run alone in torch."""
  scores = np.zeros((len(prompts), len(choices)))
  for i, prompt in enumerate(prompts):
    for c, choice in enumerate(choices):
      with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + choice])).logits[0].double()
      logp = torch.log_softmax(logits, dim=-1)
      scores[i, c] = sum(float(logp[len(prompt) - 1 + t, token]) for t, token in enumerate(choice))
  return scores


def test_label_words_of_several_tokens_score_the_sum_of_their_tokens(tiny_hf_llama):
  hf_model, config, params = tiny_hf_llama
  # Two labels share their first token, so scoring the first token alone cannot tell them apart.
  choices = [[4, 6], [4, 20, 30], [50]]
  ours = choice_logprobs(Llama(config), {'params': params}, PROMPTS, choices, pad_id=0, batch_size=4)
  reference = transformers_scores(hf_model, PROMPTS, choices)
  assert relative_error(ours, reference) < 1e-5
  assert not np.allclose(ours[:, 0], ours[:, 1])


def test_single_token_label_words_read_the_next_token_distribution(tiny_hf_llama):
  hf_model, config, params = tiny_hf_llama
  choices = [[4], [50], [77]]
  ours = choice_logprobs(Llama(config), {'params': params}, PROMPTS, choices, pad_id=0)
  assert relative_error(ours, transformers_scores(hf_model, PROMPTS, choices)) < 1e-5


def test_plain_prompts_decode_as_repeated_argmax_of_full_forward_passes(tiny_with_tokenizer):
  config, params = aj.load_model(tiny_with_tokenizer)
  tokenizer = aj.load_tokenizer(tiny_with_tokenizer)
  model, variables = Llama(config), {'params': params}
  prompts = ['Review: a gentle, funny film\nSentiment:', 'The capital of France is']
  new_tokens = 6
  answers = generate(model, variables, tokenizer, prompts, max_new_tokens=new_tokens, chat=False)
  # one compiled forward for every pass: each is padded on the right to the final length,
  # which the causal mask keeps from the logits read
  forward = jax.jit(model.apply)
  for prompt, answer in zip(prompts, answers):
    ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    out = []
    for _ in range(new_tokens):
      sequence = ids + out
      padded = sequence + [0] * (len(ids) + new_tokens - len(sequence))
      logits = forward(variables, jnp.asarray([padded], jnp.int32))
      token = int(jnp.argmax(logits[0, len(sequence) - 1]))
      if token == tokenizer.eos_token_id:
        break
      out.append(token)
    assert answer == tokenizer.decode(out, skip_special_tokens=True), prompt
    assert out  # a random model's greedy tokens: something was generated


def test_a_mixed_batch_scores_each_prompt_with_its_own_adapter(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  adapters = []
  for seed, rank in ((0, 2), (1, 4)):
    method = aj.peft.LoRA(rank=rank, alpha=4, targets=('q', 'v', 'down'))
    peft = Llama(config, peft=(method,)).init_peft(jax.random.key(seed), params)['peft']
    rng = np.random.RandomState(seed)
    adapters.append(((method,), jax.tree.map(lambda x: x + 0.3 * rng.randn(*x.shape), peft)))
  methods, stacked = aj.peft.stack(adapters, config)
  for choices in ([[4], [50]], [[4, 6], [4, 20, 30]]):  # one-token and multi-token paths
    ids = [1, 0, 1]
    mixed = choice_logprobs(Llama(config, peft=methods), {'params': params, 'peft': stacked},
                            PROMPTS, choices, pad_id=0, adapter_ids=ids)
    alone = [choice_logprobs(Llama(config, peft=m), {'params': params, 'peft': p}, PROMPTS,
                             choices, pad_id=0) for m, p in adapters]
    assert relative_error(alone[0], alone[1]) > 1e-2
    assert relative_error(mixed, np.stack([alone[a][row] for row, a in enumerate(ids)])) < 1e-5
