"""merge/unmerge: (IA)³ and LoRA folded into the base weights and back, alone and combined.

Unmerge tolerances, elementwise, u = 2⁻²⁴ (fp32 unit roundoff, round to nearest):
  (IA)³  merged W' = fl(l·W), restored R = fl(W'/l) = W(1+δ₁)(1+δ₂), |δ| ≤ u,
         so |R − W| ≤ (2u + u²)|W|.
  LoRA   W' = fl(W + Δ) = W + Δ + ε₁ with |ε₁| ≤ u|W'|; R = fl(W' − Δ) = W + ε₁ + ε₂
         with |ε₂| ≤ u|R| (the same Δ, computed by the same function), so
         |R − W| ≤ u(|W'| + |R|).
Leaves no method touches must come back bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from additive_jax.model.llama import Llama
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.lora import LoRA
from additive_jax.peft.merge import merge, unmerge
from conftest import relative_error

U = 2.0 ** -24
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
METHODS = {'ia3': IA3(), 'lora': LoRA(4, 8, ALL), 'bottleneck': Bottleneck(dim=6)}


@pytest.fixture(scope='module')
def trees(tiny_hf_llama):
  """Trained-looking leaves: (IA)³ in U(0.5, 1.5); LoRA A, B ~ N(0, 0.05), so (α/r)·A·B is
  about half the size of the base weights (std 0.02), as after training (updates ~20x the
  weights make this random network so ill-conditioned that the fp32 rounding of the merged
  weights alone moves the logits by 1e-5); bottleneck leaves N(0, 0.3)."""
  _, config, params = tiny_hf_llama
  rng = np.random.RandomState(0)
  std = {'lora': 0.05, 'bottleneck': 0.3}
  out = {}
  for key, method in METHODS.items():
    shapes = jax.eval_shape(lambda: method.init_leaves(jax.random.key(0), config, params))
    if key == 'ia3':
      out[key] = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)
    else:
      out[key] = jax.tree.map(lambda x: (std[key] * rng.randn(*x.shape)).astype(np.float32), shapes)
  return out


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.RandomState(1).randint(0, 101, (2, 9)))


def model_and_variables(tiny_hf_llama, trees, keys):
  _, config, params = tiny_hf_llama
  return (Llama(config, peft=tuple(METHODS[k] for k in keys)),
          {'params': params, 'peft': {k: trees[k] for k in keys}})


# (IA)³ before LoRA and after it: at k and v the order changes what is computed
# (l ⊙ W x + ΔW x or l ⊙ (W + ΔW) x), at down_proj it does not (l_ff scales the input of both).
@pytest.mark.parametrize('keys', [('ia3',), ('lora',), ('ia3', 'lora'), ('lora', 'ia3'),
                                  ('bottleneck', 'ia3', 'lora'), ('lora', 'bottleneck', 'ia3')],
                         ids='+'.join)
def test_merged_logits_equal_unmerged(tiny_hf_llama, trees, tokens, keys):
  model, variables = model_and_variables(tiny_hf_llama, trees, keys)
  reference = np.asarray(model.apply(variables, tokens))
  merged_model, merged = merge(model, variables)

  rest = tuple(k for k in keys if k == 'bottleneck')
  assert tuple(m.key for m in merged_model.peft) == rest
  assert sorted(merged['peft']) == list(rest)
  _, config, params = tiny_hf_llama
  base = np.asarray(Llama(config).apply({'params': params}, tokens))
  assert relative_error(reference, base) > 1e-2  # the methods really act
  assert relative_error(np.asarray(merged_model.apply(merged, tokens)), reference) <= 1e-5


def test_merge_order_matters_and_is_kept(tiny_hf_llama, trees, tokens):
  """The two orders of (IA)³ and LoRA are different models; each merges to its own logits."""
  logits = {}
  for keys in (('ia3', 'lora'), ('lora', 'ia3')):
    merged_model, merged = merge(*model_and_variables(tiny_hf_llama, trees, keys))
    logits[keys] = np.asarray(merged_model.apply(merged, tokens))
  assert relative_error(logits['ia3', 'lora'], logits['lora', 'ia3']) > 1e-3


def changed_leaves(before, after):
  flat_before, flat_after = (traverse_util.flatten_dict(t) for t in (before, after))
  assert flat_before.keys() == flat_after.keys()
  return {path for path in flat_before if not np.array_equal(flat_before[path], flat_after[path])}


def test_unmerge_restores_ia3(tiny_hf_llama, trees):
  model, variables = model_and_variables(tiny_hf_llama, trees, ('ia3',))
  merged = merge(model, variables)[1]['params']
  restored = unmerge(model, merged, variables['peft'])
  params = variables['params']
  assert changed_leaves(params, merged) == {('layers', 'self_attn', 'k_proj', 'kernel'),
                                            ('layers', 'self_attn', 'v_proj', 'kernel'),
                                            ('layers', 'mlp', 'down_proj', 'kernel')}
  for path in changed_leaves(params, restored):  # only the folded kernels may differ, and barely
    w, r = (np.asarray(traverse_util.flatten_dict(t)[path]) for t in (params, restored))
    assert np.all(np.abs(r - w) <= (2 * U + U * U) * np.abs(w)), path


def test_unmerge_restores_lora(tiny_hf_llama, trees):
  model, variables = model_and_variables(tiny_hf_llama, trees, ('lora',))
  merged = merge(model, variables)[1]['params']
  restored = unmerge(model, merged, variables['peft'])
  params = variables['params']
  assert len(changed_leaves(params, merged)) == 7  # the seven target kernels
  for path in changed_leaves(params, restored):
    w, m, r = (np.asarray(traverse_util.flatten_dict(t)[path]) for t in (params, merged, restored))
    assert np.all(np.abs(r - w) <= U * (np.abs(m) + np.abs(r))), path


def unmerge_error_bounds(params, merged, restored):
  """{leaf: (max|R − W|, its bound)} for a combined unmerge (see the test below)."""
  flat = [traverse_util.flatten_dict(t) for t in (params, merged, restored)]
  bounds = {}
  for path in flat[0]:
    w, m, r = (np.asarray(leaves[path]) for leaves in flat)
    bounds[path] = np.abs(r - w).max(), 4 * U * (np.abs(w).max() + 2 * np.abs(m).max())
  return bounds


@pytest.mark.parametrize('keys', [('ia3', 'lora'), ('lora', 'bottleneck', 'ia3')], ids='+'.join)
def test_combined_unmerge_restores_the_base_to_fp32_rounding(tiny_hf_llama, trees, keys):
  """Combined, unmerge gives back every base weight to within a few fp32 roundings: the folds
  are undone in the reverse of the merge sequence (the l_ff fold first, then the projection
  folds), or Δ would be left in the weights divided or multiplied by l.

  Bound: on k, v (l ⊙ W + Δ) chaining the two steps above gives
  |R − W| ≤ u(|W| + (2+u)|R| + |W'|/l); on down_proj (l ⊙ (W + Δ)), |R − W| ≤ u(|R| + 4|W'|/l)
  to first order. With l ≥ 0.5 here, 4u(max|W| + 2 max|W'|) per leaf covers both.
  """
  model, variables = model_and_variables(tiny_hf_llama, trees, keys)
  params = variables['params']
  merged = merge(model, variables)[1]['params']
  restored = unmerge(model, merged, variables['peft'])
  assert changed_leaves(params, restored) <= changed_leaves(params, merged)  # the rest bit-exact
  for path, (error, bound) in unmerge_error_bounds(params, merged, restored).items():
    assert error <= bound, path
  # The bound can fail: unmerging as if the methods had been merged in the other order leaves
  # Δ·(1 − 1/l) in k and v, orders of magnitude above it.
  other_order = model.clone(peft=model.peft[::-1])
  wrong = unmerge(other_order, merged, variables['peft'])
  errors = unmerge_error_bounds(params, merged, wrong)
  for name in ('k_proj', 'v_proj'):
    error, bound = errors['layers', 'self_attn', name, 'kernel']
    assert error > 100 * bound, name


def test_merge_leaves_its_input_alone(tiny_hf_llama, trees):
  model, variables = model_and_variables(tiny_hf_llama, trees, ('ia3', 'lora'))
  before = jax.tree.map(np.array, variables)
  merge(model, variables)
  jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_merge_refuses_a_bf16_base_unless_allowed(tiny_hf_llama, trees, tokens):
  _, config, params = tiny_hf_llama
  model = Llama(config.replace(param_dtype=jnp.bfloat16), peft=(IA3(),))
  variables = {'params': jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
               'peft': {'ia3': trees['ia3']}}
  with pytest.raises(ValueError, match='bfloat16.*allow_low_precision=True'):
    merge(model, variables)
  merged = merge(model, variables, allow_low_precision=True)[1]['params']
  assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_unmerge_needs_the_merged_trees(tiny_hf_llama, trees):
  model, variables = model_and_variables(tiny_hf_llama, trees, ('ia3', 'lora'))
  merged = merge(model, variables)[1]['params']
  with pytest.raises(ValueError, match=r"\['lora'\]"):
    unmerge(model, merged, {'ia3': trees['ia3']})


def test_bad_stage():
  with pytest.raises(ValueError, match='stage'):
    IA3().merge({}, {}, None, stage='mlp')
