"""P-tuning against HF PEFT's PromptEncoderConfig (MLP and LSTM encoders) on the tiny random
Llama (GQA) and once on SmolLM2-135M."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from additive_jax.model.llama import Llama
from additive_jax.peft.prompt import PromptTuning
from additive_jax.peft.ptuning import PTuning
from additive_jax.peft.registry import parse_method
from conftest import TINY, relative_error

NUM_TOKENS = 4
# widths found nowhere else in the tiny model, so a shape says which weight it is
METHODS = {'mlp': PTuning(NUM_TOKENS, encoder_hidden=12),
           'lstm': PTuning(NUM_TOKENS, encoder='lstm', encoder_hidden=7, encoder_layers=2)}
MOVED = {'mlp': ('mlp', 'layer1', 'kernel'), 'lstm': ('lstm', 'layer0', 'input_kernel')}


def peft_model_of(hf_model, method, config, seed=0):
  """`get_peft_model` with PEFT's P-tuning of `method`, its weights at PEFT's (torch's) random
  init from `seed`."""
  torch.manual_seed(seed)
  settings = peft.PromptEncoderConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=method.num_tokens,
      encoder_reparameterization_type=method.encoder.upper(),
      encoder_hidden_size=method.width(config), encoder_num_layers=method.encoder_layers)
  return peft.get_peft_model(copy.deepcopy(hf_model), settings).eval()


def leaves_of(peft_model, method):
  """Our leaves holding the weights of PEFT's prompt encoder (`embedding`, `mlp_head.*`,
  `lstm_head.*`), every one of them used exactly once."""
  state = {name: weight.detach().numpy()
           for name, weight in peft_model.prompt_encoder['default'].state_dict().items()}
  linears = 3 if method.encoder == 'mlp' else 2  # torch's Sequential: Linear at 0, 2 (, 4)
  tree = {'embedding_PD': state.pop('embedding.weight'),
          'mlp': {f'layer{i}': {'kernel': state.pop(f'mlp_head.{2 * i}.weight').T,
                                'bias': state.pop(f'mlp_head.{2 * i}.bias')}
                  for i in range(linears)}}
  if method.encoder == 'lstm':
    def both(name, layer, transpose):
      pair = [state.pop(f'lstm_head.{name}_l{layer}{suffix}') for suffix in ('', '_reverse')]
      return np.stack([w.T if transpose else w for w in pair])
    tree['lstm'] = {f'layer{l}': {'input_kernel': both('weight_ih', l, True),
                                  'hidden_kernel': both('weight_hh', l, True),
                                  'input_bias': both('bias_ih', l, False),
                                  'hidden_bias': both('bias_hh', l, False)}
                    for l in range(method.encoder_layers)}
  assert not state, sorted(state)
  return tree


def padded_batch(seed, shape=(3, 9)):
  tokens = np.random.RandomState(seed).randint(0, 101, shape)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0   # left padding
  mask[2, 6:] = 0   # right padding
  return tokens, mask


def our_logits(config, params, method, tree, tokens, mask):
  return np.asarray(Llama(config, peft=(method,)).apply(
      {'params': params, 'peft': {method.key: tree}}, jnp.asarray(tokens),
      attention_mask=jnp.asarray(mask)))


def peft_logits(peft_model, tokens, mask, num_tokens):
  with torch.no_grad():
    out = peft_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  return out.numpy()[:, num_tokens:]  # PEFT returns the virtual positions too


@pytest.mark.parametrize('encoder', list(METHODS))
def test_logits_match_hf_peft_with_padding_and_fold_keeps_them(tiny_hf_llama, encoder):
  """PEFT's model at its random init, its encoder's weights read into our leaves: the same
  logits with a left- and a right-padded row; the folded form (a plain prompt) gives them too."""
  hf_model, config, params = tiny_hf_llama
  method = METHODS[encoder]
  peft_model = peft_model_of(hf_model, method, config)
  tree = leaves_of(peft_model, method)
  tokens, mask = padded_batch(1)
  got = our_logits(config, params, method, tree, tokens, mask)
  ref = peft_logits(peft_model, tokens, mask, NUM_TOKENS)
  valid = mask.astype(bool)
  assert relative_error(got[valid], ref[valid]) <= 1e-5
  base = np.asarray(Llama(config).apply({'params': params}, jnp.asarray(tokens)))
  assert np.abs(got - base).max() > 1e-2  # the prompt changes the answer: the parity is not vacuous
  # one encoder weight moved by 0.01 (a few % of its scale) is seen: 6e-5 (mlp), 1.3e-4 (lstm)
  group, layer, name = MOVED[encoder]
  moved = jax.tree.map(np.array, tree)
  weight = moved[group][layer][name]
  weight[(0,) * weight.ndim] += 0.01
  off = our_logits(config, params, method, moved, tokens, mask)
  assert relative_error(off[valid], ref[valid]) > 2e-5

  folded_method, folded = method.fold(tree, config)
  assert folded_method == PromptTuning(NUM_TOKENS) and set(folded) == {'prompt_PD'}
  saved = peft.get_peft_model_state_dict(peft_model)['prompt_embeddings'].numpy()
  np.testing.assert_allclose(folded['prompt_PD'], saved, rtol=0, atol=1e-6 * np.abs(saved).max())
  plain = our_logits(config, params, folded_method, folded, tokens, mask)
  assert relative_error(plain[valid], got[valid]) <= 1e-6


@pytest.mark.parametrize('encoder', list(METHODS))
def test_init_has_peft_shapes_and_torch_distributions(tiny_hf_llama, encoder):
  """Our init builds PEFT's weights' shapes with torch's defaults: E ~ N(0, 1), a Linear's
  weight and bias U(±1/√fan_in), the LSTM's U(±1/√R); counted as PEFT counts them."""
  hf_model, config, params = tiny_hf_llama
  method = METHODS[encoder]
  ours = method.init_leaves(jax.random.key(0), config, params)
  peft_model = peft_model_of(hf_model, method, config)
  theirs = leaves_of(peft_model, method)
  assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, theirs)
  count = sum(x.size for x in jax.tree.leaves(ours))
  assert method.num_params(config) == count == peft_model.get_nb_trainable_parameters()[0]
  assert abs(float(jnp.std(ours['embedding_PD'])) - 1.0) < 0.2
  bounds = {f'mlp/{name}': 1 / layer['kernel'].shape[0] ** 0.5
            for name, layer in ours['mlp'].items()}
  bounds.update({f'lstm/{name}': 1 / method.width(config) ** 0.5 for name in ours.get('lstm', {})})
  for path, bound in bounds.items():
    group, name = path.split('/')
    for leaf in jax.tree.leaves(ours[group][name]):
      assert 0.8 * bound < float(jnp.abs(leaf).max()) <= bound, path


def test_gradient_reaches_every_encoder_weight(tiny_hf_llama):
  _, config, params = tiny_hf_llama
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 101, (2, 5)))
  for method in METHODS.values():
    model = Llama(config, peft=(method,))
    variables = model.init_peft(jax.random.key(0), params)
    grads = jax.grad(lambda tree: model.apply({'params': params, 'peft': tree}, tokens).sum())(
        variables['peft'])
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
      assert np.abs(np.asarray(grad)).max() > 0, (method, path)


def test_counts_the_formula_gives():
  """PEFT's prompt-based-methods guide prints 300,288 trainable parameters for bloomz-560m
  (D = 1024) with 20 virtual tokens and the MLP encoder of width 128."""
  assert PTuning(20, encoder_hidden=128).num_params(TINY.replace(hidden_size=1024)) == 300_288
  assert PTuning(4).num_params(TINY) == 4 * 48 + 3 * (48 * 48 + 48)  # R = D by default
  # torch's LSTM(48, 5, num_layers=3, bidirectional=True) has 2·(4·5·(48 + 5) + 40) + 2·2·(4·5·15 + 40)
  lstm = 2 * (20 * 53 + 40) + 2 * 2 * (20 * 15 + 40)
  assert PTuning(2, 'lstm', 5, 3).num_params(TINY) == 2 * 48 + lstm + (10 * 10 + 10) + (10 * 48 + 48)


def test_call_string_and_errors(tiny_hf_llama):
  _, config, _ = tiny_hf_llama
  method = PTuning(8, encoder='lstm', encoder_hidden=16, encoder_layers=1)
  assert method.call_string() == "PTuning(num_tokens=8, encoder='lstm', encoder_hidden=16, " \
                                 "encoder_layers=1)"
  assert parse_method(method.call_string()) == method
  assert PTuning(8).call_string() == 'PTuning(num_tokens=8)'
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match='PTuning num_tokens must be a positive integer'):
      PTuning(bad)
  with pytest.raises(ValueError, match=r"PTuning encoder must be one of \('mlp', 'lstm'\), "
                                       r"got 'gru'"):
    PTuning(4, encoder='gru')
  with pytest.raises(ValueError, match='PTuning encoder_hidden must be a positive integer, got 0'):
    PTuning(4, encoder_hidden=0)
  with pytest.raises(ValueError, match='PTuning encoder_layers must be a positive integer, got 0'):
    PTuning(4, encoder='lstm', encoder_layers=0)
  with pytest.raises(ValueError, match=r"PTuning encoder_layers=3 applies to encoder='lstm' only"):
    PTuning(4, encoder_layers=3)
  with pytest.raises(ValueError, match=r'PTuning num_tokens=12 leaves no position for a real token '
                                       r'\(max_position_embeddings=12\)'):
    Llama(config.replace(max_position_embeddings=12), peft=(PTuning(12),))
  with pytest.raises(ValueError, match=r'PromptTuning\(num_tokens=2\) and PTuning\(num_tokens=3\) '
                                       r'both prepend a soft prompt'):
    Llama(config, peft=(PromptTuning(2), PTuning(3)))


def test_smollm2_with_a_random_mlp_encoder_matches_hf_peft(smollm2, smollm2_torch):
  """The `ptuning` preset's shape (20 tokens, MLP of width 128) at PEFT's random init on the
  embedded SmolLM2-135M (transformers' model of the same GGUF), a left- and a right-padded row."""
  config, params = smollm2
  method = PTuning(20, encoder_hidden=128)
  peft_model = peft_model_of(smollm2_torch, method, config)
  tree = leaves_of(peft_model, method)
  tokens, mask = padded_batch(2, (3, 10))
  got = our_logits(config, params, method, tree, tokens, mask)
  ref = peft_logits(peft_model, tokens, mask, method.num_tokens)
  valid = mask.astype(bool)
  assert relative_error(got[valid], ref[valid]) <= 1e-5
