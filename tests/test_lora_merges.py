"""`aj.peft.merge_lora` against HF PEFT's `add_weighted_adapter` on the same weights.

Four random LoRA adapters live in one PEFT model on the tiny Llama (ranks 4, 4, 4 and 2,
different α and targets); PEFT saves them and our reader (peft/files/hf_peft.py) reads them.
PEFT merges them by each combination type, saves the merge, and we read it back and compare
it with ours: the method (rank, α, targets) and ΔW = (α/r)·a·b per target, max relative
error ≤ 1e-5. An SVD's singular vectors have arbitrary signs (torch's LAPACK and jax's pick
differently), so SVD merges are compared through ΔW; with PEFT's SVD given our sign rule
(`flip_signs`), the clamp is compared too. DARE's random masks are recorded from PEFT's
`torch.bernoulli` calls and passed to ours.
"""

import copy

import jax
import numpy as np
import peft
import pytest
import torch

import additive_jax as aj
from additive_jax.peft.lora import TARGETS
from adapter_files_helpers import random_peft
from conftest import TINY, relative_error

TOLERANCE = 1e-5
SPECS = {'a0': dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']),
         'a1': dict(r=4, lora_alpha=3, target_modules=['q_proj', 'k_proj', 'down_proj']),
         'a2': dict(r=4, lora_alpha=5, target_modules=['v_proj', 'q_proj', 'up_proj']),
         'b0': dict(r=2, lora_alpha=5, target_modules=['v_proj', 'o_proj'])}
SAME_RANK, MIXED = ['a0', 'a1', 'a2'], ['a0', 'b0', 'a1']
WEIGHTS = [0.7, -0.4, 1.3]
# (combination type, adapters, PEFT's keyword arguments)
CASES = [
    ('linear', SAME_RANK, {}),
    ('cat', MIXED, {}),
    ('svd', MIXED, {}),
    ('svd', MIXED, {'svd_rank': 2, 'svd_full_matrices': False}),
    ('ties', SAME_RANK, {'density': 0.5}),
    ('ties', SAME_RANK, {'density': 0.4, 'majority_sign_method': 'frequency'}),
    ('magnitude_prune', SAME_RANK, {'density': 0.3}),
    ('ties_svd', MIXED, {'density': 0.5}),
    ('magnitude_prune_svd', MIXED[:2], {'density': 0.5, 'svd_rank': 2}),
    ('dare_linear', SAME_RANK, {'density': 0.5}),
    ('dare_ties', SAME_RANK, {'density': 0.6}),
    ('dare_linear_svd', MIXED, {'density': 0.5}),
    ('dare_ties_svd', MIXED, {'density': 0.7, 'majority_sign_method': 'frequency'}),
    ('linear', ['a1'], {}),  # one adapter: PEFT merges it linearly
]


@pytest.fixture(scope='module')
def adapters(tiny_hf_llama, tmp_path_factory):
  """(PEFT's model holding the four adapters at random values, {name: ours read from PEFT's
  files}, our config, a scratch folder)."""
  hf_model, config, _ = tiny_hf_llama
  model = None
  for name, spec in SPECS.items():
    lora_config = peft.LoraConfig(**spec, lora_dropout=0.0)
    if model is None:
      model = peft.get_peft_model(copy.deepcopy(hf_model), lora_config, adapter_name=name)
    else:
      model.add_adapter(name, lora_config)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if '.lora_' in name:
        weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
  folder = tmp_path_factory.mktemp('lora_merges')
  model.save_pretrained(str(folder / 'adapters'))
  ours = {name: aj.peft.load_adapter(str(folder / 'adapters' / name), config) for name in SPECS}
  assert ours['b0'][0] == (aj.peft.LoRA(2, 5, ('v', 'o')),)
  return model, ours, config, folder


def peft_merge(adapters, names, weights, how, **kwargs):
  """PEFT's merge, read back with our PEFT reader."""
  model, _, config, folder = adapters
  merged = f'merged_{how}'
  model.add_weighted_adapter(names, weights, merged, combination_type=how, **kwargs)
  model.save_pretrained(str(folder / 'merged'), selected_adapters=[merged])
  model.delete_adapter(merged)
  return aj.peft.load_adapter(str(folder / 'merged' / merged), config)


def our_kwargs(kwargs):
  names = {'svd_rank': 'rank', 'svd_full_matrices': 'svd_full_matrices'}
  return {names.get(key, key): value for key, value in kwargs.items()}


def delta_error(ours, theirs):
  """max over targets of the relative error of ΔW = (α/r)·a·b, and the target."""
  (method,), tree = ours
  (their_method,), their_tree = theirs
  assert method == their_method
  deltas = [(relative_error(*(m.scaling * np.einsum('lir,lro->lio', t['lora'][target]['a'],
                                                    t['lora'][target]['b'])
                              for m, t in ((method, tree), (their_method, their_tree)))), target)
            for target in method.targets]
  return max(deltas)


def recorded_masks(calls, names, ours, how, num_layers):
  """PEFT's torch.bernoulli draws as our masks: it merges module by module (layer by layer,
  each layer's targets in model order), drawing per module A's mask of each adapter that has
  it, then B's (or ΔW's, for the _svd rules), in torch's layout (transposed here)."""
  methods = [ours[name][0][0] for name in names]
  leaves = ('delta',) if how.endswith('svd') else ('a', 'b')
  draws = iter(calls)
  per_leaf = {}
  for _ in range(num_layers):
    for target in (t for t in TARGETS if any(t in m.targets for m in methods)):
      present = [i for i, m in enumerate(methods) if target in m.targets]
      for leaf in leaves:
        for i in present:
          per_leaf.setdefault((i, target, leaf), []).append(next(draws).numpy().T)
  assert next(draws, None) is None  # every draw used
  masks = [{} for _ in names]
  for (i, target, leaf), layers in per_leaf.items():
    masks[i].setdefault(target, {})[leaf] = np.stack(layers)
  return masks


def flip_signs(svd):
  """torch.linalg.svd with our sign rule (task_arithmetic.truncated_svd): each column of U
  has its largest |entry| positive."""
  def flipped(x, *args, **kwargs):
    u, s, vh = svd(x, *args, **kwargs)
    k = min(u.shape[-1], vh.shape[-2])
    largest = u[u[:, :k].abs().argmax(0), torch.arange(k)]
    sign = torch.where(largest < 0, -1.0, 1.0)
    u, vh = u.clone(), vh.clone()
    u[:, :k] *= sign
    vh[:k] *= sign[:, None]
    return u, s, vh
  return flipped


@pytest.mark.parametrize('how, names, kwargs', CASES)
def test_merge_lora_is_pefts_add_weighted_adapter(adapters, monkeypatch, how, names, kwargs):
  _, ours, config, _ = adapters
  weights = WEIGHTS[:len(names)]
  calls = []
  bernoulli = torch.bernoulli
  monkeypatch.setattr(torch, 'bernoulli',
                      lambda *a, **k: calls.append(bernoulli(*a, **k)) or calls[-1])
  # DARE's masks from a fixed seed, whatever ran before: a truncated SVD's ΔW is as
  # well-conditioned as the gap σ_R − σ_R+1 of the pruned sum, and one draw in the eight seeds
  # tried differs by 1.5e-5 (1e-6 to 2e-6 for the others)
  torch.manual_seed(0)
  theirs = peft_merge(adapters, names, weights, how, **kwargs)
  masks = recorded_masks(calls, names, ours, how, config.num_layers) if how.startswith('dare') else None
  assert bool(calls) == how.startswith('dare')
  merged = aj.peft.merge_lora([ours[n] for n in names], weights, how, masks=masks,
                              **our_kwargs(kwargs))
  error, target = delta_error(merged, theirs)
  print(f'{how} {kwargs}: max relative error of ΔW {error:.2e} ({target})')
  assert error <= TOLERANCE, (target, error)
  if not how.endswith('svd'):  # the leaves themselves, where no SVD picks signs
    for t in merged[0][0].targets:
      for leaf in 'ab':
        assert relative_error(merged[1]['lora'][t][leaf], theirs[1]['lora'][t][leaf]) <= TOLERANCE
  # the comparison can fail: one B of one adapter scaled by 1.001 (a single entry could be
  # one that TIES or DARE drop)
  method, tree = ours[names[-1]][0][0], ours[names[-1]][1]['lora']
  target = method.targets[-1]
  moved = {**tree, target: {**tree[target], 'b': np.asarray(tree[target]['b']) * 1.001}}
  perturbed = aj.peft.merge_lora([ours[n] for n in names[:-1]] + [((method,), {'lora': moved})],
                                 weights, how, masks=masks, **our_kwargs(kwargs))
  error, target = delta_error(perturbed, theirs)
  print(f'{how}: {names[-1]} perturbed: {error:.2e} ({target})')
  assert error > TOLERANCE


@pytest.mark.parametrize('clamp', [0.9, 0.5])
def test_svd_clamp_is_pefts_given_one_sign_rule(adapters, monkeypatch, clamp):
  """At a rank no larger than every target's ΔW's (a singular vector of a zero singular value
  is any vector of the null space, and the clamp's quantile reads it)."""
  _, ours, _, _ = adapters
  monkeypatch.setattr(torch.linalg, 'svd', flip_signs(torch.linalg.svd))
  theirs = peft_merge(adapters, MIXED, WEIGHTS, 'svd', svd_rank=2, svd_clamp=clamp)
  merged = aj.peft.merge_lora([ours[n] for n in MIXED], WEIGHTS, 'svd', rank=2, svd_clamp=clamp)
  unclamped = aj.peft.merge_lora([ours[n] for n in MIXED], WEIGHTS, 'svd', rank=2)
  assert delta_error(unclamped, theirs)[0] > 1e-2  # the clamp acts
  error, target = delta_error(merged, theirs)
  print(f'svd_clamp={clamp}: max relative error of ΔW {error:.2e} ({target})')
  assert error <= TOLERANCE


def test_dare_draws_its_masks_from_rng(adapters):
  _, ours, _, _ = adapters
  merge = lambda seed: aj.peft.merge_lora([ours[n] for n in SAME_RANK], WEIGHTS, 'dare_ties',
                                          density=0.5, rng=jax.random.key(seed))
  one, again, other = merge(0), merge(0), merge(1)
  a = lambda m: np.asarray(m[1]['lora']['q']['a'])
  np.testing.assert_array_equal(a(one), a(again))
  assert not np.array_equal(a(one), a(other))


LORA, OTHER = (aj.peft.LoRA(4),), (aj.peft.LoRA(2, targets=('q', 'k')),)


@pytest.mark.parametrize('methods, weights, kwargs, message', [
    ([], [], {}, 'merge_lora needs at least one adapter'),
    ([LORA], [1.0], {'how': 'mean'}, "merge_lora how must be one of svd, linear, .*, got 'mean'"),
    ([LORA, LORA], [1.0, 1.0], {'how': 'ties'},
     r"merge_lora how='ties' needs a density in \(0, 1\], got None"),
    ([LORA, LORA], [1.0, 1.0], {'how': 'ties', 'density': 1.5}, 'needs a density in'),
    ([LORA, LORA], [1.0, 1.0], {'how': 'linear', 'density': 0.5},
     "merge_lora how='linear' prunes nothing: density is for ties, "),
    ([LORA, LORA], [1.0, 1.0], {'how': 'ties', 'density': 0.5, 'majority_sign_method': 'mean'},
     "merge_lora majority_sign_method must be one of .*, got 'mean'"),
    ([LORA, LORA], [1.0, 1.0], {'how': 'linear', 'rank': 2},
     "merge_lora how='linear' keeps the adapters' rank: rank and svd_clamp are for the _svd"),
    ([LORA, LORA], [1.0, 1.0], {'rank': 0}, 'merge_lora rank must be a positive integer, got 0'),
    ([LORA, LORA], [1.0, 1.0], {'svd_clamp': 2}, r'svd_clamp must be a quantile in \[0, 1\]'),
    ([LORA, (aj.peft.IA3(),)], [1.0, 1.0], {},
     r'merge_lora: adapter 1 holds IA3\(\); it merges adapters of one LoRA each'),
    ([LORA, (aj.peft.LoRA(4, gate='token'),)], [1.0, 1.0], {},
     "merge_lora: adapter 1 is LoRA.*gate='token'.*, a gated LoRA"),
    ([LORA, LORA], [1.0], {}, 'merge_lora: 1 weights for 2 adapters'),
    ([LORA, OTHER], [1.0, 1.0], {'how': 'linear'},
     r"merge_lora how='linear' needs adapters of one rank, got ranks \[4, 2\]"),
    ([LORA, OTHER], [1.0, 1.0], {'rank': 17},
     r"merge_lora rank=17 exceeds min\(I, O\)=16 of target 'k'"),
    ([LORA, LORA], [1.0, 1.0], {'how': 'dare_linear', 'density': 0.5},
     "merge_lora how='dare_linear' drops entries at random: pass rng="),
    ([LORA, LORA], [1.0, 1.0], {'how': 'dare_linear', 'density': 0.5, 'masks': [{}, {}]},
     r"merge_lora: masks\[0\]\['q'\]\['a'\] has shape None, adapter 0 needs \(3, 48, 4\)"),
    ([LORA, LORA], [1.0, 1.0], {'how': 'cat', 'masks': [{}, {}]},
     "merge_lora how='cat' draws nothing: masks are for dare_"),
])
def test_bad_merges_are_named(methods, weights, kwargs, message):
  with pytest.raises(ValueError, match=message):
    aj.peft.merge_lora([(m, random_peft(m, TINY)) for m in methods], weights, **kwargs)
