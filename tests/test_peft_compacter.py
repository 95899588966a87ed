"""Compacter: AdapterHub's PHM formula re-typed in torch on the HF Llama, identity at init,
counts, decoding, stacks, training, and both file formats here (AdapterHub itself reads and
writes them in tests/adapterhub, run from test_adapter_files_adapterhub.py).

The torch reference builds each H as AdapterHub's `PHMLayer.forward` does (`torch.bmm` for
the factorized W and rule, its `kronecker_product`, summed over the n terms) and adds the
adapters with test_peft_bottleneck's hooks, which place them where AdapterHub's Llama does.
"""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file

import additive_jax as aj
from additive_jax.eval.decode import generate_ids
from additive_jax.model.llama import Llama
from additive_jax.peft.compacter import Compacter
from additive_jax.peft.param_count import count_leaves
from additive_jax.peft.stack import apply_mixed
from adapter_files_helpers import assert_same_leaves, random_peft
from conftest import LLAMA_3_2_1B, TINY, relative_error
from test_generation import CONFIG as SMALL, cached_logits, greedy_by_full_passes
from test_peft_bottleneck import base_logits, reference_logits, tokens  # noqa: F401 (fixtures)
from test_train_step import make_batch, run_steps

# On the tiny Llama (D 48): R = 12 (reduction 4) or 8 (6), n = 4 or 2, every option once
CONFIGS = {
    'compacter': Compacter(reduction_factor=4),
    'compacterpp': Compacter(reduction_factor=4, placement='pfeiffer'),
    'own_factorized_rules_rank2': Compacter(6, shared_phm_rule=False, factorized_phm_rule=True,
                                            phm_rank=2, placement='pfeiffer', activation='relu'),
    'full_w_no_bias_parallel': Compacter(4, phm_dim=2, factorized_phm_W=False, phm_bias=False,
                                         placement='parallel', activation='silu', scale=4.0),
    'shared_w_factorized_rule': Compacter(6, factorized_phm_rule=True, shared_W_phm=True,
                                          scale=0.5),
}


def kronecker_product(a, b):
  """AdapterHub's (methods/modeling.py, from rabeehk/compacter): kron over the last two axes."""
  rows, cols = a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1]
  return (a.unsqueeze(-1).unsqueeze(-3) * b.unsqueeze(-2).unsqueeze(-4)).reshape(
      *a.shape[:-2], rows, cols)


def adapterhub_h(method, tree, site, projection, layer):
  """H of one PHMLayer as `PHMLayer.forward` computes it, from our leaves."""
  shared = {k: torch.tensor(np.asarray(v)) for k, v in traverse_util.flatten_dict(
      tree.get('shared', {}), sep='/').items()}
  own = {k: torch.tensor(np.asarray(v[layer])) for k, v in tree.get(site, {}).get(projection,
                                                                                 {}).items()}
  leaf = lambda name: own[name] if name in own else shared.get(f'{projection}/{name}',
                                                                 shared.get(name))
  w = torch.bmm(leaf('w_left'), leaf('w_right')) if method.factorized_phm_W else leaf('w')
  rule = (torch.bmm(leaf('rule_left'), leaf('rule_right')) if method.factorized_phm_rule
          else leaf('rule'))
  return kronecker_product(rule, w).sum(0).numpy(), (own['bias'].numpy() if 'bias' in own else 0)


def adapterhub_reference(hf_model, method, tree, config, tokens):
  """The HF Llama with AdapterHub's adapters of H = Σ A_c ⊗ W_c at `method`'s placement."""
  dense = {}
  for site in method.sites:
    per_layer = {'down': [], 'down_bias': [], 'up': [], 'up_bias': []}
    for layer in range(config.num_layers):
      for projection, width in (('down', method.bottleneck_dim(config)),
                                ('up', config.hidden_size)):
        h, bias = adapterhub_h(method, tree, site, projection, layer)
        per_layer[projection].append(h)
        per_layer[f'{projection}_bias'].append(np.broadcast_to(bias, (width,)))
    dense[site] = {name: np.stack(values).astype(np.float32) for name, values in per_layer.items()}
  return reference_logits(hf_model, method, dense, tokens)


def random_tree(method, config, seed):
  """Every leaf N(0, 0.4²): products of three factors that move the logits well away."""
  return jax.tree.map(lambda x: 4 * x, random_peft((method,), config, seed)['compacter'])


def our_logits(config, params, method, tree, tokens):
  model = Llama(config, peft=(method,))
  return np.asarray(model.apply({'params': params, 'peft': {'compacter': tree}}, jnp.asarray(tokens)))


@pytest.mark.parametrize('name', CONFIGS)
def test_identity_at_init(tiny_hf_llama, tokens, base_logits, name):
  _, config, params = tiny_hf_llama
  model = Llama(config, peft=(CONFIGS[name],))
  variables = model.init_peft(jax.random.key(0), params)
  np.testing.assert_array_equal(np.asarray(model.apply(variables, jnp.asarray(tokens))),
                                base_logits)


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_match_adapterhubs_formula(tiny_hf_llama, tokens, base_logits, name):
  hf_model, config, params = tiny_hf_llama
  method = CONFIGS[name]
  tree = random_tree(method, config, seed=3)
  ours = our_logits(config, params, method, tree, tokens)
  assert relative_error(ours, base_logits) > 1e-2  # the adapter really acts
  assert relative_error(ours, adapterhub_reference(hf_model, method, tree, config, tokens)) <= 1e-5


def test_a_perturbed_weight_fails_the_parity_check(tiny_hf_llama, tokens):
  """The check above sees one entry of one factor moved by 0.01 (its leaves are ~0.1)."""
  hf_model, config, params = tiny_hf_llama
  method = CONFIGS['compacter']
  tree = random_tree(method, config, seed=3)
  reference = adapterhub_reference(hf_model, method, tree, config, tokens)
  for path in (('shared', 'rule'), ('mlp', 'up', 'w_left')):
    moved = jax.tree.map(np.array, tree)
    leaf = moved[path[0]] if len(path) == 2 else moved[path[0]][path[1]]
    leaf[path[-1]].flat[1] += 0.01
    assert relative_error(our_logits(config, params, method, moved, tokens), reference) > 1e-5


def test_init_is_the_identity_with_xavier_w_and_rules_of_std_one_over_n():
  """W xavier-normal as AdapterHub's, biases zero; the up projection's W_right zero (H_up = 0);
  rules N(0, 1/n²), factors of a factorized one N(0, 1/n). Statistics on Llama-3.2-1B's
  shapes (no weights read)."""
  tree = Compacter().init_leaves(jax.random.key(0), LLAMA_3_2_1B, None)
  assert abs(np.asarray(tree['shared']['rule']).std() / 0.25 - 1) < 0.3
  for site in ('attn', 'mlp'):
    down, up = tree[site]['down'], tree[site]['up']
    assert down['w_left'].shape == (16, 4, 512, 1) and up['w_right'].shape == (16, 4, 1, 512)
    assert abs(np.asarray(down['w_left']).std() / (2 / 513) ** 0.5 - 1) < 0.05
    assert abs(np.asarray(up['w_left']).std() / (2 / 17) ** 0.5 - 1) < 0.05
    np.testing.assert_array_equal(up['w_right'], 0)
    np.testing.assert_array_equal(down['bias'], 0)
  own = Compacter(shared_phm_rule=False, factorized_phm_rule=True).init_leaves(
      jax.random.key(0), LLAMA_3_2_1B, None)
  assert abs(np.asarray(own['mlp']['down']['rule_left']).std() / 0.5 - 1) < 0.1


@pytest.mark.parametrize('method, expected', [
    (Compacter(), 2 * 16 * (2 * (2048 + 64) + 64 + 2048) + 64),
    (Compacter(placement='pfeiffer'), 16 * (2 * (2048 + 64) + 64 + 2048) + 64),
    (Compacter(phm_rank=4, shared_phm_rule=False), 2 * 16 * (8 * 2112 + 2112 + 2 * 64)),
    (Compacter(factorized_phm_rule=True, factorized_phm_W=False, phm_bias=False),
     2 * 16 * (2 * 2048 * 64 // 4) + 2 * 16),
    (Compacter(shared_W_phm=True, phm_dim=8), 2 * 16 * 2112 + 512 + 2 * 2112)],
    ids=['compacter', 'compacterpp', 'own_rules_rank4', 'full_w', 'shared_w'])
def test_parameter_count(method, expected):
  assert method.num_params(LLAMA_3_2_1B) == expected
  assert count_leaves((method,), LLAMA_3_2_1B) == {'compacter': expected}
  tiny = dataclasses.replace(method, reduction_factor=6, phm_dim=2)  # R 8 on D 48
  assert tiny.num_params(TINY) == count_leaves((tiny,), TINY)['compacter']


def test_the_preset_counts_on_smollm2_widths():
  config = TINY.replace(hidden_size=576, num_layers=30)  # SmolLM2's D and L: all a count reads
  for preset, sites in (('compacter', 2), ('compacterpp', 1)):
    method = Compacter(**Compacter.presets[preset])
    assert method.bottleneck_dim(config) == 36
    assert count_leaves((method,), config)['compacter'] == sites * 30 * (2 * 612 + 612) + 64


@pytest.mark.parametrize('kwargs, match', [
    (dict(placement='sequential'), 'Compacter placement must be one of'),
    (dict(activation='tanh'), 'Compacter activation must be one of'),
    (dict(reduction_factor=0), 'reduction_factor must be a positive number, got 0'),
    (dict(phm_dim=0), 'phm_dim must be a positive integer, got 0'),
    (dict(phm_rank=1.5), 'phm_rank must be a positive integer, got 1.5'),
    (dict(shared_phm_rule='yes'), "shared_phm_rule must be True or False, got 'yes'"),
    (dict(shared_W_phm=True, factorized_phm_W=False),
     'shared_W_phm=True needs factorized_phm_W=True: AdapterHub cannot build'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Compacter(**kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(), r'phm_dim=4 must divide the hidden size 48 and the bottleneck int\(48 // 32\) = 1'),
    (dict(reduction_factor=8, phm_dim=5), 'phm_dim=5 must divide the hidden size 48'),
    (dict(reduction_factor=100), r'gives a bottleneck of int\(48 // 100\) = 0; it must lie in')])
def test_widths_phm_dim_does_not_divide_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Llama(TINY, peft=(Compacter(**kwargs),))


def test_cached_decoding_and_a_left_padded_row_decode_as_alone():
  params = nn.unbox(Llama(SMALL).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  for method in (Compacter(4), Compacter(4, placement='parallel', shared_phm_rule=False)):
    model = Llama(SMALL, peft=(method,))
    variables = {'params': params, 'peft': random_peft((method,), SMALL, seed=1)}
    toks = jnp.asarray(np.random.RandomState(3).randint(0, SMALL.vocab_size, (2, 9)), jnp.int32)
    full = jax.jit(model.apply)(variables, toks)
    assert relative_error(full, jax.jit(Llama(SMALL).apply)({'params': params}, toks)) > 1e-2
    assert relative_error(cached_logits(model, variables, toks, prompt_length=5), full) <= 1e-5
  prompts = [[5, 9, 11, 2, 40, 7, 3], [17, 4]]  # the second is left-padded in the batch
  together = generate_ids(model, variables, prompts, max_new_tokens=5)
  for prompt, generated in zip(prompts, together):
    assert generated == greedy_by_full_passes(model, variables, prompt, 5)
    assert generate_ids(model, variables, [prompt], max_new_tokens=5) == [generated]


def test_adapters_of_other_widths_and_ranks_stack_exactly_others_are_refused():
  params = nn.unbox(Llama(SMALL).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  families = {  # R 4, 8, 16 on D 32, ranks 1 to 3
      (Compacter(2, phm_rank=3),): [Compacter(8, phm_rank=3), Compacter(2)],
      (Compacter(4, phm_rank=2, shared_phm_rule=False, factorized_phm_W=False, shared_W_phm=False),):
          [Compacter(8, shared_phm_rule=False, factorized_phm_W=False),
           Compacter(4, phm_rank=2, shared_phm_rule=False, factorized_phm_W=False)],
      (Compacter(4, phm_rank=2, shared_W_phm=True, factorized_phm_rule=True),):
          [Compacter(8, phm_rank=2, shared_W_phm=True, factorized_phm_rule=True),
           Compacter(4, shared_W_phm=True, factorized_phm_rule=True)]}
  ids, toks = [1, 0, 1], jnp.asarray(np.random.RandomState(4).randint(0, 61, (3, 7)))
  for expected, methods in families.items():
    adapters = [((m,), {'compacter': random_tree(m, SMALL, seed)})
                for seed, m in enumerate(methods, 10)]
    stacked_methods, stacked = aj.peft.stack(adapters, SMALL)
    assert stacked_methods == expected
    mixed = jax.jit(functools.partial(apply_mixed, Llama(SMALL, peft=stacked_methods)))(
        {'params': params, 'peft': stacked}, jnp.asarray(ids), toks)
    for row, adapter in enumerate(ids):
      m, p = adapters[adapter]
      alone = jax.jit(Llama(SMALL, peft=m).apply)({'params': params, 'peft': p}, toks[row:row + 1])
      assert relative_error(mixed[row], alone[0]) <= 1e-5, (expected, row)
  other = Compacter(4, phm_dim=2, shared_phm_rule=False)
  with pytest.raises(ValueError, match=r'cannot share a stack: their phm_dim, shared_phm_rule '
                                       r'differ, so their leaves have no common form'):
    aj.peft.stack([((Compacter(4),), random_peft((Compacter(4),), SMALL, 1)),
                   ((other,), random_peft((other,), SMALL, 1))], SMALL)


@pytest.mark.parametrize('method', [CONFIGS['compacter'], CONFIGS['own_factorized_rules_rank2'],
                                    CONFIGS['shared_w_factorized_rule'],
                                    Compacter(6, shared_W_phm=True, phm_bias=False)],
                         ids=lambda m: m.call_string())
def test_trains_and_every_leaf_moves(tiny_hf_llama, method):
  """Three steps at the default learning rate: the loss falls and every leaf has moved (step 1
  moves what has a gradient at init: the up projection's W_right and the biases)."""
  _, _, params = tiny_hf_llama
  batch = make_batch(np.random.RandomState(0), 2, 12, TINY.vocab_size)
  losses, initial, final = run_steps([method], params, batch, steps=3)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(initial),
                                   jax.tree.leaves(final)):
    assert not np.array_equal(np.asarray(before), np.asarray(after)), jax.tree_util.keystr(path)


@pytest.mark.parametrize('name', CONFIGS)
def test_our_format_round_trip(tmp_path, name):
  method = CONFIGS[name]
  peft = random_peft((method,), TINY)
  aj.peft.save_adapter(str(tmp_path), (method,), peft, TINY)
  methods, loaded = aj.peft.load_adapter(str(tmp_path), TINY)
  assert methods == (method,)
  assert_same_leaves(loaded, peft)
  record = json.loads((tmp_path / 'aj_adapter_config.json').read_text())['methods'][0]
  assert record['adapter_type'] == 'compacter' and record['phm_dim'] == method.phm_dim


@pytest.mark.parametrize('name', CONFIGS)
def test_adapterhub_format_round_trip(tmp_path, name):
  method = CONFIGS[name]
  peft = random_peft((method,), TINY)
  aj.peft.save_adapter(str(tmp_path), (method,), peft, TINY, format='adapterhub')
  saved = json.loads((tmp_path / 'adapter_config.json').read_text())['config']
  assert saved['phm_layer'] is True and saved['mh_adapter'] == (method.placement == 'houlsby')
  assert {k: saved[k] for k in ('phm_dim', 'phm_rank', 'shared_phm_rule', 'shared_W_phm')} == {
      'phm_dim': method.phm_dim, 'phm_rank': method.phm_rank,
      'shared_phm_rule': method.shared_phm_rule, 'shared_W_phm': method.shared_W_phm}
  assert saved['init_weights'] == 'bert'  # also for parallel: mam_adapter fails on PHM layers
  methods, loaded = aj.peft.load_adapter(str(tmp_path), TINY)
  assert methods == (method,)
  assert_same_leaves(loaded, peft)


def test_adapterhub_tensor_names_and_shapes(tmp_path):
  """What AdapterHub itself saves for CompacterConfig(reduction_factor=4) on D = 48."""
  method = CONFIGS['compacter']
  peft = random_peft((method,), TINY)
  aj.peft.save_adapter(str(tmp_path), (method,), peft, TINY, format='adapterhub')
  tensors = load_file(tmp_path / 'adapter.safetensors')
  prefix = 'model.layers.1.attention_adapters.adapters.bottleneck.'
  assert {name[len(prefix):]: tensors[name].shape for name in tensors if name.startswith(prefix)} == {
      'adapter_down.0.W_left': (4, 12, 1), 'adapter_down.0.W_right': (4, 1, 3),
      'adapter_down.0.b': (12,), 'adapter_up.W_left': (4, 3, 1), 'adapter_up.W_right': (4, 1, 12),
      'adapter_up.b': (48,)}
  assert len(tensors) == 3 * 2 * 6 + 1
  np.testing.assert_array_equal(tensors['model.shared_parameters.bottleneck.phm_rule'],
                                peft['compacter']['shared']['rule'])
  np.testing.assert_array_equal(tensors[prefix + 'adapter_up.W_left'],
                                peft['compacter']['attn']['up']['w_left'][1])


@pytest.mark.parametrize('change, match', [
    ({'learn_phm': False}, r'learn_phm=False \(needs True\): rules that do not train'),
    ({'factorized_phm_W': False, 'shared_W_phm': True}, 'shared_W_phm=True needs factorized_phm_W'),
    ({'phm_dim': 5}, r'phm_dim=5 must divide the hidden size 48'),
    ({'phm_rank': 2}, r"tensor 'model.layers.0.attention_adapters.adapters.bottleneck.adapter_down"
                      r".0.W_left' has shape \(4, 12, 1\), this model needs \(4, 12, 2\)"),
    ({'phm_bias': 'true'}, "phm_bias must be True or False, got 'true'")])
def test_unsupported_or_inconsistent_adapterhub_compacters_are_named(tmp_path, change, match):
  method = CONFIGS['compacter']
  aj.peft.save_adapter(str(tmp_path), (method,), random_peft((method,), TINY), TINY,
                       format='adapterhub')
  path = tmp_path / 'adapter_config.json'
  raw = json.loads(path.read_text())
  raw['config'].update(change)
  path.write_text(json.dumps(raw))
  with pytest.raises(aj.peft.AdapterFileError, match=match):
    aj.peft.load_adapter(str(tmp_path), TINY)


def test_a_shared_w_is_written_with_an_integer_reduction_factor(tmp_path):
  """AdapterHub sizes a shared W from in_features // reduction_factor: a float fails there."""
  method = Compacter(5.5, shared_W_phm=True)  # int(48 // 5.5) = 8, as int(48 // 6)
  aj.peft.save_adapter(str(tmp_path), (method,), random_peft((method,), TINY), TINY,
                       format='adapterhub')
  assert json.loads((tmp_path / 'adapter_config.json').read_text())['config'][
      'reduction_factor'] == 6
  assert aj.peft.load_adapter(str(tmp_path), TINY)[0] == (Compacter(6, shared_W_phm=True),)
