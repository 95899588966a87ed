"""`aj.peft.average`: the weighted average of adapters of one method set, against AdapterHub's
`average_adapter` on the same weights (and HF PEFT's (IA)³ `add_weighted_adapter`, an
unnormalized average), and its refusals.

AdapterHub pins transformers 4.57, so it averages in its own venv (the one
tests/adapterhub/run.sh creates; this test runs run.sh once if the venv is not there):
our adapters are written as AdapterHub files, tests/adapterhub/average_side.py averages
them there and saves the averages, and we read those back and compare them with ours.
ADDITIVE_JAX_ADAPTERHUB=0 skips it.
"""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

import additive_jax as aj
from adapter_files_helpers import random_peft
from conftest import TINY as CONFIG, relative_error

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(os.environ.get('ADDITIVE_JAX_CACHE',
                                   os.path.join(os.path.expanduser('~'), '.cache', 'additive_jax')),
                    'adapterhub-venv')
TOLERANCE = 1e-5
LORA = aj.peft.LoRA(3, 6, ('q', 'k', 'v', 'up', 'down'))
# case: (methods, number of adapters, weights, combine_strategy, normalize_weights, svd_rank)
CASES = {
    'seq_bn': ((aj.peft.Bottleneck(6, 'pfeiffer', 'gelu'),), 3, None, 'linear', True, None),
    'double_seq_bn': ((aj.peft.Bottleneck(5, 'houlsby', 'silu', scale=0.5),), 2, [1.0, 3.0],
                      'linear', True, None),
    'par_bn': ((aj.peft.Bottleneck(12, 'parallel', 'relu', scale=4.0),), 2, [0.7, -0.4],
               'linear', False, None),
    'compacter': ((aj.peft.Compacter(4),), 2, [0.25, 0.75], 'linear', True, None),
    'prefix': ((aj.peft.PrefixTuning(5, 12, embedding_width='hidden', positions='from_zero'),), 2,
               [0.3, 0.7], 'linear', True, None),
    'lora': ((LORA,), 2, [0.6, 0.4], 'linear', True, None),
    'lora_negate_b': ((LORA,), 3, [0.8, -0.5, 0.2], 'lora_linear_only_negate_b', False, None),
    'lora_svd': ((LORA,), 2, [0.5, 0.9], 'lora_delta_w_svd', True, 2),
}


def delta_w(methods, peft):
  """{target: (α/r)·a·b [L, I, O]} of a LoRA adapter."""
  lora = methods[0]
  return {t: lora.scaling * np.einsum('lir,lro->lio', np.asarray(peft['lora'][t]['a']),
                                      np.asarray(peft['lora'][t]['b'])) for t in lora.targets}


def worst_error(ours, theirs, strategy):
  """Max relative error over the leaves (over ΔW per target for an SVD: its signs are
  arbitrary), and where."""
  if strategy == 'lora_delta_w_svd':
    ours, theirs = delta_w(*ours), delta_w(*theirs)
  else:
    ours, theirs = (traverse_util.flatten_dict(x[1], sep='/') for x in (ours, theirs))
  assert ours.keys() == theirs.keys()
  return max((relative_error(ours[name], theirs[name]), name) for name in theirs)


def adapterhub_venv_python() -> str:
  """The AdapterHub venv's python; created by run.sh (its whole cross-check) when missing."""
  if not os.path.exists(os.path.join(VENV, 'complete')):
    result = subprocess.run(['bash', os.path.join(REPOSITORY, 'tests', 'adapterhub', 'run.sh')],
                            env={**os.environ, 'MAIN_PYTHON': sys.executable}, capture_output=True,
                            text=True, check=False, timeout=1200)
    assert os.path.exists(os.path.join(VENV, 'complete')), result.stdout + result.stderr[-3000:]
  return os.path.join(VENV, 'bin', 'python')


@pytest.mark.skipif(os.environ.get('ADDITIVE_JAX_ADAPTERHUB') == '0',
                    reason='AdapterHub cross-check skipped (ADDITIVE_JAX_ADAPTERHUB=0)')
def test_average_is_adapterhubs_average_adapter(tiny_hf_llama, tmp_path):
  _, config, params = tiny_hf_llama
  aj.peft.save_merged(str(tmp_path / 'base'), aj.Llama(config), {'params': params})
  cases, inputs = {}, {}
  for number, (case, (methods, count, weights, strategy, normalize, rank)) in enumerate(CASES.items()):
    inputs[case] = [str(tmp_path / 'in' / f'{case}_{i}') for i in range(count)]
    for i, directory in enumerate(inputs[case]):
      aj.peft.save_adapter(directory, methods, random_peft(methods, config, seed=10 * number + i),
                           config, format='adapterhub')
    cases[case] = {'inputs': inputs[case], 'weights': weights, 'combine_strategy': strategy,
                   'normalize_weights': normalize, 'svd_rank': rank}
  (tmp_path / 'cases.json').write_text(json.dumps(cases), encoding='utf-8')
  result = subprocess.run([adapterhub_venv_python(),
                           os.path.join(REPOSITORY, 'tests', 'adapterhub', 'average_side.py'),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  for case, (methods, _, weights, strategy, normalize, rank) in CASES.items():
    adapters = [aj.peft.load_adapter(d, config) for d in inputs[case]]
    ours = aj.peft.average(adapters, weights, normalize_weights=normalize,
                           combine_strategy=strategy, svd_rank=rank)
    theirs = aj.peft.load_adapter(str(tmp_path / 'theirs' / case), config)
    assert ours[0] == theirs[0], case
    error, leaf = worst_error(ours, theirs, strategy)
    print(f'{case}: max relative error {error:.2e} ({leaf})')
    assert error <= TOLERANCE, (case, leaf, error)
    # the comparison can fail: one input weight moved by 1e-3 of the largest
    methods, peft = adapters[-1]
    flat = traverse_util.flatten_dict(jax.tree.map(np.array, peft), sep='/')
    name = sorted(flat)[0]
    flat[name].flat[0] += 1e-3 * np.abs(flat[name]).max()
    moved = aj.peft.average(adapters[:-1] + [(methods, traverse_util.unflatten_dict(flat, sep='/'))],
                            weights, normalize_weights=normalize, combine_strategy=strategy,
                            svd_rank=rank)
    error, leaf = worst_error(moved, theirs, strategy)
    print(f'{case}: {name} perturbed: max relative error {error:.2e} ({leaf})')
    assert error > TOLERANCE, (case, error)


def test_average_weights_default_to_equal_and_are_normalized():
  methods = (aj.peft.Bottleneck(4),)
  trees = [random_peft(methods, CONFIG, seed) for seed in range(3)]
  adapters = [(methods, tree) for tree in trees]
  leaf = lambda peft: np.asarray(peft['bottleneck']['mlp']['down'])
  mean = sum(leaf(t) for t in trees) / 3
  got_methods, got = aj.peft.average(adapters)
  assert got_methods == methods and leaf(got).dtype == np.float32
  np.testing.assert_allclose(leaf(got), mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(leaf(aj.peft.average(adapters, [2, 2, 2])[1]), mean, rtol=1e-6,
                             atol=1e-7)
  raw = aj.peft.average(adapters, [1.0, -2.0, 0.5], normalize_weights=False)[1]
  np.testing.assert_allclose(leaf(raw), leaf(trees[0]) - 2 * leaf(trees[1]) + 0.5 * leaf(trees[2]),
                             rtol=1e-6, atol=1e-6)


def test_a_prompt_started_from_text_averages_with_one_started_from_the_vocabulary():
  one, two = aj.peft.PromptTuning(3), aj.peft.PromptTuning(3, init='text', text='a good film')
  methods, _ = aj.peft.average([((one,), random_peft((one,), CONFIG)),
                                ((two,), random_peft((two,), CONFIG, 1))])
  assert methods == (one,)


BOTTLENECK = (aj.peft.Bottleneck(4),)


@pytest.mark.parametrize('adapters, kwargs, message', [
    ([], {}, 'average needs at least one adapter'),
    ([BOTTLENECK, (aj.peft.LoRA(4),)], {},
     r"average: adapter 1 has the methods \['lora'\], adapter 0 \['bottleneck'\]; average takes "
     'adapters of one method set'),
    ([BOTTLENECK, (aj.peft.Bottleneck(4, activation='gelu'),)], {},
     r"average: adapter 1 has Bottleneck\(dim=4, activation='gelu'\), adapter 0 "
     r'Bottleneck\(dim=4\); average takes adapters of one method set'),
    ([BOTTLENECK, 'wider'], {},
     r"average: adapter 1's leaf bottleneck/mlp/down has shape \(3, 48, 6\), adapter 0's "
     r'\(3, 48, 4\)'),
    ([BOTTLENECK, BOTTLENECK], {'weights': [1.0]}, 'average: 1 weights for 2 adapters'),
    ([BOTTLENECK, BOTTLENECK], {'weights': [1.0, float('nan')]},
     'average: weights must be finite numbers, got nan'),
    ([BOTTLENECK, BOTTLENECK], {'weights': [1.0, -1.0]},
     r'average: the weights \[1.0, -1.0\] sum to 0 and cannot be normalized; pass '
     'normalize_weights=False'),
    ([BOTTLENECK], {'combine_strategy': 'ties'},
     'average combine_strategy must be one of linear, lora_linear_only_negate_b, '
     "lora_delta_w_svd, got 'ties'"),
    ([BOTTLENECK], {'combine_strategy': 'lora_linear_only_negate_b'},
     r"average combine_strategy='lora_linear_only_negate_b' is for adapters of one ungated "
     r'LoRA, not Bottleneck\(dim=4\)'),
    ([(aj.peft.LoRA(4),)], {'combine_strategy': 'lora_delta_w_svd'},
     "average: svd_rank is needed by combine_strategy='lora_delta_w_svd', and by no other"),
    ([(aj.peft.LoRA(4),)], {'svd_rank': 2}, 'average: svd_rank is needed by'),
    ([(aj.peft.LoRA(4),)], {'combine_strategy': 'lora_delta_w_svd', 'svd_rank': 17},
     "average svd_rank=17 exceeds min\\(I, O\\) of target 'v'"),
])
def test_bad_averages_are_named(adapters, kwargs, message):
  built = []
  for methods in adapters:
    if methods == 'wider':  # the settings of adapter 0, the leaves of another width
      built.append((BOTTLENECK, random_peft((aj.peft.Bottleneck(6),), CONFIG)))
    else:
      built.append((methods, random_peft(methods, CONFIG)))
  with pytest.raises(ValueError, match=message):
    aj.peft.average(built, **kwargs)


def test_unnormalized_average_of_ia3_is_pefts_add_weighted_adapter(tiny_hf_llama, tmp_path):
  """HF PEFT's (IA)³ `add_weighted_adapter` is Σ w_i l_i, weights as given."""
  hf_model, config, _ = tiny_hf_llama
  model = peft.get_peft_model(copy.deepcopy(hf_model), peft.IA3Config(), adapter_name='a0')
  model.add_adapter('a1', peft.IA3Config())
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if '.ia3_l.' in name:
        weight.copy_(1 + 0.3 * torch.randn(weight.shape, generator=generator))
  weights = [0.7, 0.6]
  model.add_weighted_adapter(['a0', 'a1'], weights, 'merged')
  model.save_pretrained(str(tmp_path), selected_adapters=['a0', 'a1', 'merged'])
  adapters = [aj.peft.load_adapter(str(tmp_path / name), config) for name in ('a0', 'a1')]
  theirs = aj.peft.load_adapter(str(tmp_path / 'merged'), config)
  ours = aj.peft.average(adapters, weights, normalize_weights=False)
  assert ours[0] == theirs[0] == (aj.peft.IA3(),)
  error, leaf = worst_error(ours, theirs, 'linear')
  print(f'(IA)³: max relative error {error:.2e} ({leaf})')
  assert error <= TOLERANCE
  normalized = aj.peft.average(adapters, weights)  # what AdapterHub's default would give
  assert worst_error(normalized, theirs, 'linear')[0] > TOLERANCE
