"""Decoding for every method: cached equals uncached (a prefix's inference form too), greedy equals repeated argmax, a padded
row decodes as it would alone, sampling follows its distribution, stop strings, many adapters
in one batch, and clear errors.

Every method's leaves are random and distinct (N(0, 0.3) around their init), so each moves
the logits well away from the base's and from the other adapters' (checked), and no equality
below holds by accident.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.eval.decode import generate_ids
from additive_jax.eval.sampling import Sampling, filtered_logits, next_tokens
from additive_jax.model.config import LlamaConfig
from additive_jax.model.llama import Llama
from additive_jax.peft.merge import inference_form
from additive_jax.peft.stack import apply_mixed
from conftest import relative_error

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rope_theta=1000.0, max_position_embeddings=64)
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
METHODS = {
    'pfeiffer': (aj.peft.Bottleneck(dim=4),),
    'houlsby': (aj.peft.Bottleneck(dim=4, placement='houlsby', activation='gelu'),),
    'parallel': (aj.peft.Bottleneck(dim=4, placement='parallel', activation='silu', scale=2.0),),
    'ia3': (aj.peft.IA3(),),
    'lora': (aj.peft.LoRA(rank=2, alpha=4, targets=ALL),),
    'prompt': (aj.peft.PromptTuning(num_tokens=3),),
    'prefix': (aj.peft.PrefixTuning(num_tokens=3),),
    'prefix_projection': (aj.peft.PrefixTuning(num_tokens=2, projection_dim=5),),
    'ptuning_lstm': (aj.peft.PTuning(num_tokens=3, encoder='lstm', encoder_hidden=5),),
    'ladder': (aj.peft.LadderSide(reduction=2),),
    'loreft': (aj.peft.ReFT(rank=2, layers=(1,), prefix_positions=3, tied=True,
                            activation='gelu'),),
    'adaption_prompt': (aj.peft.AdaptionPrompt(num_tokens=3, num_layers=1),),
    'mam': (aj.peft.PrefixTuning(3, 5, embedding_width='hidden', positions='from_zero'),
            aj.peft.Bottleneck(dim=4, placement='parallel', scale=4.0)),
    'unipelt': (aj.peft.PrefixTuning(2, 4, embedding_width='hidden', positions='from_zero',
                                     gate='token'),
                aj.peft.Bottleneck(dim=3, gate='token'), aj.peft.LoRA(2, 2, gate='token')),
    'houlsby+ia3+lora+prompt+prefix': (aj.peft.Bottleneck(dim=4, placement='houlsby'),
                                       aj.peft.IA3(), aj.peft.LoRA(rank=2, alpha=4, targets=ALL),
                                       aj.peft.PromptTuning(num_tokens=2),
                                       aj.peft.PrefixTuning(num_tokens=3)),
}


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']


def random_peft(methods, params, seed):
  peft = Llama(CONFIG, peft=methods).init_peft(jax.random.key(seed), params)['peft']
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rng.randn(*x.shape), jnp.float32), peft)


def tokens(seed, shape=(2, 9)):
  return jnp.asarray(np.random.RandomState(seed).randint(0, CONFIG.vocab_size, shape), jnp.int32)


def cached_logits(model, variables, tokens_BT, prompt_length):
  """Logits of the prompt in one call (the prefill), then of each later token alone (one
  compiled step: every decode call has the same shapes)."""
  cache = model.init_cache(tokens_BT.shape[0], tokens_BT.shape[1])
  logits, cache = model.apply(variables, tokens_BT[:, :prompt_length], cache=cache)
  steps, decode = [logits], jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  for t in range(prompt_length, tokens_BT.shape[1]):
    logits, cache = decode(variables, tokens_BT[:, t:t + 1], cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


def greedy_by_full_passes(model, variables, prompt, new_tokens):
  """Repeated argmax of the uncached model over the prompt and what it generated so far. Each
  pass is padded on the right to the final length, so that one compiled forward serves every
  step: under the causal mask the padding after a position does not reach its logits."""
  forward, length, out = jax.jit(model.apply), len(prompt) + new_tokens, []
  for _ in range(new_tokens):
    sequence = prompt + out
    logits = forward(variables, jnp.asarray([sequence + [0] * (length - len(sequence))],
                                            jnp.int32))
    out.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
  return out


@pytest.mark.parametrize('name', list(METHODS))
def test_cached_decoding_equals_the_full_forward_pass_at_every_step(params, name):
  model = Llama(CONFIG, peft=METHODS[name])
  variables = {'params': params, 'peft': random_peft(METHODS[name], params, 1)}
  toks = tokens(3)
  full = model.apply(variables, toks)
  assert relative_error(full, Llama(CONFIG).apply({'params': params}, toks)) > 1e-2
  assert relative_error(cached_logits(model, variables, toks, prompt_length=5), full) <= 1e-5


# the methods with decoding state of their own (prompt, ladder), the adaption prompt (keys no
# cache holds, seen by padding too) and every other kind at once
@pytest.mark.parametrize('name', ['prompt', 'ladder', 'loreft', 'adaption_prompt',
                                  'houlsby+ia3+lora+prompt+prefix'])
def test_greedy_equals_argmax_and_a_padded_row_decodes_as_alone(params, name):
  model = Llama(CONFIG, peft=METHODS[name])
  variables = {'params': params, 'peft': random_peft(METHODS[name], params, 1)}
  prompts = [[5, 9, 11, 2, 40, 7, 3], [17, 4]]  # the second is left-padded in the batch
  together = generate_ids(model, variables, prompts, max_new_tokens=6)
  for prompt, generated in zip(prompts, together):
    assert generated == greedy_by_full_passes(model, variables, prompt, 6)
    assert generate_ids(model, variables, [prompt], max_new_tokens=6) == [generated]


def test_merged_methods_decode_the_tokens_of_unmerged_ones(params):
  methods = (aj.peft.IA3(), aj.peft.LoRA(rank=2, alpha=4, targets=ALL), aj.peft.Bottleneck(dim=4))
  model = Llama(CONFIG, peft=methods)
  variables = {'params': params, 'peft': random_peft(methods, params, 1)}
  merged_model, merged = aj.peft.merge(model, variables)
  assert [m.key for m in merged_model.peft] == ['bottleneck']
  prompts = [[5, 9, 11, 2], [17, 4]]
  assert (generate_ids(merged_model, merged, prompts, max_new_tokens=6) ==
          generate_ids(model, variables, prompts, max_new_tokens=6))


def test_the_inference_form_of_a_reparameterized_prefix_gives_the_same_logits(params):
  model = Llama(CONFIG, peft=METHODS['prefix_projection'])
  variables = {'params': params, 'peft': random_peft(METHODS['prefix_projection'], params, 1)}
  folded_model, folded = inference_form(model, variables)
  assert folded_model.peft == (aj.peft.PrefixTuning(num_tokens=2),)
  assert set(folded['peft']['prefix']) == {'k_LPKH', 'v_LPKH'}
  toks = tokens(4, (2, 7))
  assert relative_error(folded_model.apply(folded, toks), model.apply(variables, toks)) <= 1e-6


def test_sampling_is_reproducible_and_top_k_one_is_greedy(params):
  model = Llama(CONFIG, peft=METHODS['lora'])
  variables = {'params': params, 'peft': random_peft(METHODS['lora'], params, 1)}
  prompts = [[5, 9, 11], [17, 4, 8, 30]]
  hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
  first = generate_ids(model, variables, prompts, max_new_tokens=8, sampling=hot)
  assert generate_ids(model, variables, prompts, max_new_tokens=8, sampling=hot) == first
  other = generate_ids(model, variables, prompts, max_new_tokens=8,
                       sampling=Sampling(temperature=1.5, top_p=0.95, seed=8))
  assert other != first
  greedy = generate_ids(model, variables, prompts, max_new_tokens=8)
  assert generate_ids(model, variables, prompts, max_new_tokens=8,
                      sampling=Sampling(temperature=2.0, top_k=1, seed=3)) == greedy


def chi_square_p(counts, expected) -> float:
  statistic = float(((counts - expected) ** 2 / expected).sum())
  return float(jax.scipy.special.gammaincc((len(counts) - 1) / 2, statistic / 2))


@pytest.mark.parametrize('sampling', [Sampling(temperature=0.7, top_k=5, seed=1),
                                      Sampling(temperature=1.3, top_p=0.8, seed=2),
                                      Sampling(temperature=1.0, seed=3)],
                         ids=['top_k=5', 'top_p=0.8', 'plain'])
def test_draws_follow_the_tempered_softmax_over_the_kept_set(sampling):
  logits_V = jnp.asarray(np.random.RandomState(0).randn(16) * 2, jnp.float32)
  draws = 20_000
  drawn = np.asarray(next_tokens(jnp.broadcast_to(logits_V, (draws, 16)), jax.random.key(5),
                                 sampling))
  probs = np.asarray(jax.nn.softmax(logits_V / sampling.temperature), np.float64)
  order = np.argsort(-probs)
  if sampling.top_k:
    kept = order[:sampling.top_k]
  else:  # the smallest most-likely set whose mass reaches top_p
    mass = np.cumsum(probs[order])
    kept = order[:int(np.searchsorted(mass, sampling.top_p) + 1)]
  assert set(np.unique(drawn)) <= set(kept.tolist())  # none outside the kept set
  expected = probs[kept] / probs[kept].sum() * draws
  counts = np.array([(drawn == token).sum() for token in kept])
  assert chi_square_p(counts, expected) > 1e-3
  finite = np.isfinite(np.asarray(filtered_logits(logits_V[None], sampling))[0])
  assert sorted(np.flatnonzero(finite)) == sorted(kept.tolist())


def test_many_adapters_in_one_batch_give_each_row_its_own(params):
  """Three LoRA adapters of different ranks and three bottlenecks of different dims, stacked:
  each row of one mixed batch gets the logits and the tokens of its adapter run alone."""
  for kind, methods in (('lora', [aj.peft.LoRA(rank=r, alpha=4, targets=ALL) for r in (1, 2, 4)]),
                        ('bottleneck', [aj.peft.Bottleneck(dim=d) for d in (2, 4, 8)]),
                        ('reft', [aj.peft.ReFT(rank=r, prefix_positions=2, suffix_positions=1)
                                  for r in (1, 2, 3)])):
    adapters = [((m,), random_peft((m,), params, seed)) for seed, m in enumerate(methods, 10)]
    stacked_methods, stacked = aj.peft.stack(adapters, CONFIG)
    model = Llama(CONFIG, peft=stacked_methods)
    variables = {'params': params, 'peft': stacked}
    ids = [2, 0, 1, 2]
    toks = tokens(4, (4, 7))
    mixed = apply_mixed(model, variables, jnp.asarray(ids), toks)
    alone = [Llama(CONFIG, peft=m).apply({'params': params, 'peft': p}, toks)
             for m, p in adapters]
    assert relative_error(alone[0], alone[1]) > 1e-2 and relative_error(alone[1], alone[2]) > 1e-2
    for row, adapter in enumerate(ids):
      assert relative_error(mixed[row], alone[adapter][row]) <= 1e-5, (kind, row)
    prompts = [[5, 9, 11], [17, 4], [8, 30, 2, 6], [5, 9, 11]]
    generated = generate_ids(model, variables, prompts, max_new_tokens=5, adapter_ids=ids)
    for row, adapter in enumerate(ids):
      m, p = adapters[adapter]
      assert generated[row] == generate_ids(Llama(CONFIG, peft=m), {'params': params, 'peft': p},
                                            [prompts[row]], max_new_tokens=5)[0], (kind, row)


@pytest.mark.parametrize('name', ['ia3', 'prompt', 'prefix_projection', 'ptuning_lstm', 'ladder',
                                  'mam', 'unipelt', 'houlsby+ia3+lora+prompt+prefix'])
def test_every_method_stacks(params, name):
  adapters = [(METHODS[name], random_peft(METHODS[name], params, seed)) for seed in (1, 2)]
  methods, stacked = aj.peft.stack(adapters, CONFIG)
  toks = tokens(6, (2, 6))
  mixed = apply_mixed(Llama(CONFIG, peft=methods), {'params': params, 'peft': stacked},
                      jnp.asarray([1, 0]), toks)
  for row, adapter in enumerate([1, 0]):
    m, p = adapters[adapter]
    alone = Llama(CONFIG, peft=m).apply({'params': params, 'peft': p}, toks[row:row + 1])
    assert relative_error(mixed[row], alone[0]) <= 1e-5


def test_bad_input_is_refused(params):
  model = Llama(CONFIG, peft=METHODS['prompt'])
  variables = {'params': params, 'peft': random_peft(METHODS['prompt'], params, 1)}
  with pytest.raises(ValueError, match=r'a prompt of 50 tokens and 20 new ones \(\+ 3 prompt '
                                       r'vectors and prefix positions\) need 73 positions; the model '
                                       r'has max_position_embeddings=64'):
    generate_ids(model, variables, [[1] * 50], max_new_tokens=20)
  with pytest.raises(ValueError, match='top_p must lie in'):
    Sampling(temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match='top_p must lie in'):
    Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match='temperature must be a number ≥ 0'):
    Sampling(temperature=-0.5)
  with pytest.raises(ValueError, match='a stack holds adapters of one method set'):
    aj.peft.stack([(METHODS['ia3'], random_peft(METHODS['ia3'], params, 1)),
                   (METHODS['lora'], random_peft(METHODS['lora'], params, 1))], CONFIG)
  lora_qv = (aj.peft.LoRA(rank=2, targets=('q', 'v')),)
  with pytest.raises(ValueError, match='their targets differ'):
    aj.peft.stack([(METHODS['lora'], random_peft(METHODS['lora'], params, 1)),
                   (lora_qv, random_peft(lora_qv, params, 1))], CONFIG)


def test_a_decode_step_updates_the_cache_in_place():
  """The donated cache is carried through the layers and written where it is: the compiled step
  aliases it to its output and holds no second copy of it (before, every layer's cache went
  into a new stacked one: temporaries larger than the cache)."""
  import dataclasses
  from additive_jax.eval import decode
  model = Llama(dataclasses.replace(CONFIG, num_layers=8, max_position_embeddings=4096))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  cache = decode._empty_cache(model, 2, 4000)  # a layer's keys and values: 1/8 of it
  cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
  args = (jax.device_put(np.zeros(2, np.int32)), jax.device_put(np.zeros(2, np.int32)), cache,
          jax.random.key(0))
  compiled = decode._decode_step.lower(model, Sampling(), False, {'params': params},
                                       *args).compile()
  memory = compiled.memory_analysis()
  assert memory.alias_size_in_bytes >= cache_bytes
  assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


def test_token_gates_are_causal_and_a_sequence_gate_refuses_a_cache(params):
  """gate='token' (UniPELT here): a token's logits do not move when a later token changes; gate=
  'sequence' (AdapterHub's mean over the call) moves them, and is refused with a KV cache."""
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, CONFIG.vocab_size, (2, 6)))
  later = tokens.at[:, -1].set((tokens[:, -1] + 1) % CONFIG.vocab_size)
  moved = {}
  for gate in ('token', 'sequence'):
    methods = tuple(dataclasses.replace(m, gate=gate) for m in METHODS['unipelt'])
    model = Llama(CONFIG, peft=methods)
    variables = {'params': params, 'peft': random_peft(methods, params, 1)}
    before, after = (np.asarray(model.apply(variables, t))[:, :-1] for t in (tokens, later))
    moved[gate] = np.abs(before - after).max()
  assert moved['token'] == 0 and moved['sequence'] > 1e-4, moved
  with pytest.raises(ValueError, match=r"PrefixTuning\(.*gate='sequence'\) reads every token of "
                                       r'the sequence at each token: it cannot decode with a KV cache'):
    model.apply(variables, tokens, cache=model.init_cache(2, 8))
