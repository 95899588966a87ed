"""ReFT: torch's householder parametrization, the identity at init, counts, the positions a
padded or packed row gets, what a decoding step intervenes at, files, and errors.

AdapterHub's logits on the same weights (LoReFT, NoReFT, DiReFT; its files both ways) are
checked in tests/adapterhub (test_adapter_files_adapterhub.py runs it)."""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import additive_jax as aj
from additive_jax.model.llama import Llama
from additive_jax.peft.files import AdapterFileError
from additive_jax.peft.files.adapterhub_reft import householder_parameter
from additive_jax.peft.param_count import count_leaves
from additive_jax.peft.reft import ReFT, orthonormal_rows
from adapter_files_helpers import random_peft
from conftest import TINY as CONFIG, relative_error


@pytest.fixture(scope='module')
def params():
  return nn.unbox(Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']


def apply(methods, params, peft, tokens, **kwargs):
  return Llama(CONFIG, peft=methods).apply({'params': params, 'peft': peft}, tokens, **kwargs)


def test_the_householder_map_is_torchs_and_reading_inverts_it():
  """orthonormal_rows is torch's `parametrizations.orthogonal` of an [r, D] weight (base = I);
  householder_parameter gives an X whose rows are any orthonormal rows, here torch's with a
  random trivialization base (what AdapterHub files hold)."""
  r, d = 3, 10
  torch.manual_seed(0)
  layer = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(d, r, bias=False))
  x = torch.randn(r, d)
  x.diagonal().copy_(torch.tensor([1.0, -1.0, 1.0]))
  with torch.no_grad():
    layer.parametrizations.weight.original.copy_(x)
    rows_with_base = layer.weight.numpy().copy()  # base · H(X): base is a random orthogonal matrix
    layer.parametrizations.weight[0].base.copy_(torch.eye(d))
    rows = layer.weight.numpy()
  assert relative_error(orthonormal_rows(jnp.asarray(x.numpy())), rows) <= 1e-6
  refolded = orthonormal_rows(jnp.asarray(householder_parameter(rows_with_base), jnp.float32))
  assert relative_error(refolded, rows_with_base) <= 1e-6
  assert relative_error(rows_with_base, rows) > 0.1  # the base mattered


@pytest.mark.parametrize('kind', ['loreft', 'noreft', 'direft'])
def test_identity_at_init_orthonormal_rows_and_counts(params, kind):
  method = ReFT(rank=3, layers=(0, 2), prefix_positions=2, suffix_positions=1, kind=kind)
  variables = Llama(CONFIG, peft=(method,)).init_peft(jax.random.key(1), params)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 7)))
  base = Llama(CONFIG).apply({'params': params}, tokens)
  assert relative_error(apply((method,), params, variables['peft'], tokens), base) <= 1e-6
  rows = method.projection_matrix(variables['peft']['reft'])
  if kind == 'loreft':
    np.testing.assert_allclose(np.einsum('nurd,nusd->nurs', rows, rows),
                               np.broadcast_to(np.eye(3), (2, 2, 3, 3)), atol=1e-6)
  expected = 2 * 2 * (2 * 48 * 3 + 3)  # 2 layers, 2 units, D = 48, r = 3
  assert count_leaves((method,), CONFIG)['reft'] == method.num_params(CONFIG) == expected
  assert dataclasses.replace(method, tied=True).num_params(CONFIG) == 2 * (2 * 48 * 3 + 3)


def test_positions_count_each_rows_and_segments_real_tokens(params):
  """A left-padded row, a right-padded row and two packed segments get the logits of their
  tokens alone: the prefix and suffix are counted among real tokens, per segment."""
  method = ReFT(rank=2, prefix_positions=2, suffix_positions=2, kind='noreft')
  peft = random_peft((method,), CONFIG, 3)
  rng = np.random.RandomState(4)
  first, second = rng.randint(0, CONFIG.vocab_size, 5), rng.randint(0, CONFIG.vocab_size, 4)
  alone = [apply((method,), params, peft, jnp.asarray([s])) [0] for s in (first, second)]
  assert relative_error(alone[0], apply((), params, {}, jnp.asarray([first]))[0]) > 1e-2
  left = jnp.asarray([[0, 0, 0, *first]])
  out = apply((method,), params, peft, left, attention_mask=jnp.asarray([[0, 0, 0] + [1] * 5]),
              positions=jnp.asarray([[0, 0, 0, 0, 1, 2, 3, 4]]))
  assert relative_error(out[0, 3:], alone[0]) <= 1e-5
  right = jnp.asarray([[*second, 0, 0]])
  out = apply((method,), params, peft, right, attention_mask=jnp.asarray([[1] * 4 + [0, 0]]))
  assert relative_error(out[0, :4], alone[1]) <= 1e-5
  packed = jnp.asarray([[*first, *second]])
  out = apply((method,), params, peft, packed, segment_ids=jnp.asarray([[1] * 5 + [2] * 4]),
              positions=jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3]]))
  assert relative_error(out[0, :5], alone[0]) <= 1e-5
  assert relative_error(out[0, 5:], alone[1]) <= 1e-5


@dataclasses.dataclass(frozen=True)
class SuffixAtPrompt(ReFT):
  """ReFT whose suffix is the last `suffix_positions` of the first `prompt_length` tokens,
  however long the call: the reference for what a cached decode computes. (Its own key and no
  presets, so that the registry's `reft` and `loreft` stay ReFT's.)"""
  prompt_length: int = 0

  key: ClassVar[str] = 'reft_at_prompt'
  presets: ClassVar[dict] = {}

  def layer_output(self, p, x_BTD, ctx):
    index = ctx.token_index_BT
    in_prompt = (index >= 0) & (index < self.prompt_length)
    after = jnp.where(in_prompt, self.prompt_length - 1 - index, 2**30)
    return super().layer_output(p, x_BTD, ctx.replace(tokens_after_BT=after))


def test_a_decoding_step_intervenes_at_the_prompt_not_at_the_new_token(params):
  """With suffix positions, the prefill intervenes at the prompt's last tokens and no later
  step at its own token: every step equals the uncached forward over the whole sequence that
  intervenes at the prompt's suffix; with a prompt shorter than the prefix, the first new
  tokens are still prefix positions, as in the uncached forward."""
  method = ReFT(rank=2, prefix_positions=4, suffix_positions=2, kind='loreft')
  peft = random_peft((method,), CONFIG, 5)
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, CONFIG.vocab_size, (1, 8)))
  model = Llama(CONFIG, peft=(method,))
  variables = {'params': params, 'peft': peft}
  step = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))  # one program for every call
  for prompt_length in (2, 5):
    logits, cache = step(variables, tokens[:, :prompt_length], model.init_cache(1, 8))
    steps = [logits]
    for t in range(prompt_length, 8):
      logits, cache = step(variables, tokens[:, t:t + 1], cache)
      steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    reference = SuffixAtPrompt(**{f.name: getattr(method, f.name) for f in
                                  dataclasses.fields(method)}, prompt_length=prompt_length)
    uncached = apply((reference,), params, {'reft_at_prompt': peft['reft']}, tokens)
    assert relative_error(cached, uncached) <= 1e-5
    # the suffix moves with the sequence's end in an uncached forward: not what was cached
    assert relative_error(cached, apply((method,), params, peft, tokens)) > 1e-3


def test_files_round_trip_and_direft_is_not_written_for_adapterhub(params, tmp_path):
  tokens = jnp.asarray(np.random.RandomState(7).randint(0, CONFIG.vocab_size, (2, 6)))
  for i, method in enumerate([ReFT(2, layers=(1, 2), suffix_positions=1),
                              ReFT(3, prefix_positions=0, suffix_positions=2, kind='noreft',
                                   tied=True, activation='silu'),
                              ReFT(1, kind='direft')]):
    peft = random_peft((method,), CONFIG, i)
    expected = apply((method,), params, peft, tokens)
    formats = ('aj', 'adapterhub') if method.kind != 'direft' else ('aj',)
    for fmt in formats:
      directory = tmp_path / f'{i}_{fmt}'
      aj.peft.save_adapter(str(directory), (method,), peft, CONFIG, format=fmt)
      methods, loaded = aj.peft.load_adapter(str(directory), CONFIG)
      assert methods == (method,)
      assert relative_error(apply(methods, params, loaded, tokens), expected) <= 1e-6, (i, fmt)
  with pytest.raises(AdapterFileError, match='would read DiReFT as NoReFT'):
    aj.peft.save_adapter(str(tmp_path / 'direft'), (method,), peft, CONFIG, format='adapterhub')


def test_gradients_reach_every_trainable(params):
  method = ReFT(rank=2, prefix_positions=2, suffix_positions=2)
  peft = random_peft((method,), CONFIG, 8)
  tokens = jnp.asarray(np.random.RandomState(9).randint(0, CONFIG.vocab_size, (2, 6)))
  grads = jax.grad(lambda p: jnp.sum(apply((method,), params, p, tokens) ** 2))(peft)
  for name, grad in grads['reft'].items():
    grad = np.asarray(grad)
    if name == 'original':  # its diagonal holds signs: no gradient, by design
      grad = np.tril(np.swapaxes(grad, -1, -2), -1)
    assert np.abs(grad).max() > 0, name


@pytest.mark.parametrize('kwargs, match', [
    (dict(rank=0), 'rank must be a positive integer'),
    (dict(prefix_positions=0), 'needs prefix_positions or suffix_positions > 0'),
    (dict(kind='lo'), 'kind must be one of'),
    (dict(layers=(1, 1)), 'distinct layer indices'),
    (dict(activation='tanh'), 'activation must be None or one of'),
])
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ReFT(**kwargs)


def test_a_layer_or_rank_the_model_lacks_is_named():
  with pytest.raises(ValueError, match=r'names layer 3; the model has 3 \(0…2\)'):
    Llama(CONFIG, peft=(ReFT(layers=(0, 3)),))
  with pytest.raises(ValueError, match='rank=49 exceeds the hidden size 48'):
    Llama(CONFIG, peft=(ReFT(rank=49),))


def test_different_positions_cannot_share_a_stack(params):
  a, b = ReFT(2, prefix_positions=2), ReFT(2, prefix_positions=3)
  with pytest.raises(ValueError, match='cannot share a stack: they intervene at different'):
    aj.peft.stack([((a,), random_peft((a,), CONFIG, 0)), ((b,), random_peft((b,), CONFIG, 1))],
                  CONFIG)
