"""The weights stay on the device: the decode loop, a scoring pass and a train step move nothing
from the host but what they place explicitly, for the embedded GGUF default, an HF directory
and a bf16-stored base.

`aj.load_model` and `aj.peft.load_adapter` hand out `jax.Array`s; every per-call host input
(tokens, masks, positions, adapter ids, the PRNG seed) is placed with `jax.device_put`. Under
`jax.transfer_guard_host_to_device('disallow')` an implicit transfer raises, so a host array
among the weights, which every jitted call would copy again, fails these tests (the last one
shows it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.eval.classify import choice_logprobs
from additive_jax.eval.decode import generate_ids
from additive_jax.train.config_checks import check_config
from additive_jax.train.loss_budget import derive_budget
from additive_jax.data.pipeline import make_train_iterator
from additive_jax.train.mesh import global_batch
from additive_jax.train.prepare import build
from additive_jax.train.step import jit_train_step
from cli_helpers import in_process_config
from conftest import SMOLLM2

METHODS = (aj.peft.LoRA(rank=2, alpha=4, targets=('q', 'v')), aj.peft.Bottleneck(dim=4))


@pytest.fixture(scope='module', params=['gguf', 'hf', 'hf_bf16'])
def base(request, tiny_with_tokenizer):
  """(path, config, params) of each base, as `aj.load_model` gives them."""
  path = SMOLLM2 if request.param == 'gguf' else tiny_with_tokenizer
  dtype = {'param_dtype': jnp.bfloat16} if request.param == 'hf_bf16' else {}
  config, params = aj.load_model(path, **dtype)
  return path, config, params


def variables_of(config, params):
  model = aj.Llama(config, peft=METHODS)
  return model, model.init_peft(jax.random.key(0), params)


def test_the_weights_come_on_the_device(base):
  _, config, params = base
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))


def test_decoding_and_scoring_transfer_nothing_implicitly(base):
  _, config, params = base
  model, variables = variables_of(config, params)
  with jax.transfer_guard_host_to_device('disallow'):
    out = generate_ids(model, variables, [[5, 6, 7], [8, 9]], max_new_tokens=3)
    single = choice_logprobs(model, variables, [[5, 6, 7], [8, 9]], [[3], [4]], pad_id=0)
    multi = choice_logprobs(model, variables, [[5, 6, 7], [8, 9]], [[3, 4], [4]], pad_id=0)
  assert [len(row) <= 3 for row in out] == [True, True]
  assert np.isfinite(single).all() and np.isfinite(multi).all()


def test_a_train_step_transfers_nothing_implicitly(base, small_sst2):
  path, *_ = base
  config = in_process_config(path, small_sst2, list(METHODS))
  config.seq_len = 32
  mesh, methods = check_config(config)
  run = build(config, mesh, methods)
  iterator, _ = make_train_iterator(config.data, run.tokenizer, batch_size=8, seq_len=32, seed=0)
  budget = derive_budget(config.loss_positions, iterator, 32)
  step = jit_train_step(run.model, run.optimizer, 1, mesh, config.rules, run.state_shardings,
                        run.param_shardings, budget)
  state = run.state
  with jax.transfer_guard_host_to_device('disallow'):
    for _ in range(2):
      state, metrics = step(state, run.params, global_batch(next(iterator), mesh))
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))


def test_host_weights_are_caught(tiny_with_tokenizer):
  config, params = aj.load_model(tiny_with_tokenizer)
  model, variables = variables_of(config, jax.tree.map(np.asarray, params))
  with jax.transfer_guard_host_to_device('disallow'):
    with pytest.raises(Exception, match='Disallowed host-to-device transfer'):
      generate_ids(model, variables, [[5, 6, 7]], max_new_tokens=2)
