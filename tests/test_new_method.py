"""A method defined here, in the test file alone, is a method like the built-in ones: it trains
through the experiment config, counts, saves and reloads in our adapter format, and decodes
with a KV cache, with no file of the project edited.

The method: a learned bias on every layer's MLP output, x = r + f + s·b_l (b_l: [D] per layer,
zero at init, so the identity). Parameters: L · D.
"""

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.eval.decode import generate
from additive_jax.export import export_run
from additive_jax.model.llama import KVCache, Llama
from additive_jax.peft.param_count import count_methods
from additive_jax.train.config import default_config, with_methods
from additive_jax.train.config_checks import check_config
from additive_jax.train.loop import train_and_evaluate
from conftest import relative_error


@dataclasses.dataclass(frozen=True)
class MlpOutputBias(aj.peft.Method):
  scale: float = 1.0

  key: ClassVar[str] = 'mlp_output_bias'
  presets: ClassVar[dict] = {'mlp_output_bias': {}, 'mlp_output_bias_half': {'scale': 0.5}}
  optimizer_defaults: ClassVar[dict] = {'learning_rate': 0.05, 'schedule': 'constant'}

  def num_params(self, config) -> int:
    return config.num_layers * config.hidden_size

  def init_leaves(self, rng, config, params, tokenizer=None):
    return {'bias_LD': jnp.zeros((config.num_layers, config.hidden_size), jnp.float32)}

  def mlp_delta(self, p, r, f):
    return self.scale * p['bias_LD'].astype(f.dtype)

  def file_fields(self, config) -> dict:
    return {'adapter_type': 'mlp_output_bias', 'scaling': self.scale}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """(config, workdir, summary) of a 3-step run of the new method's 'half' preset."""
  config = with_methods(default_config(), 'mlp_output_bias_half')
  config.model, config.data.data_dir = tiny_with_tokenizer, small_sst2
  config.batch_size, config.seq_len, config.num_steps = 8, 32, 3
  config.log_every, config.eval_every, config.eval_batches, config.checkpoint_every = 1, 3, 1, 3
  config.peft.mlp_output_bias.optimizer.learning_rate = 0.02  # its own optimizer block
  config.lock()
  workdir = tmp_path_factory.mktemp('run')
  return config, workdir, train_and_evaluate(config, str(workdir))


def test_its_config_entry_holds_its_fields_and_optimizer():
  config = with_methods(default_config(), 'mlp_output_bias_half')
  assert config.peft.to_dict() == {'mlp_output_bias': {
      'scale': 0.5, 'optimizer': {'learning_rate': 0.05, 'schedule': 'constant',
                                  'warmup_steps': 10, 'weight_decay': 0.0}}}


def test_it_trains_through_the_config(trained, tiny_with_tokenizer):
  config, workdir, summary = trained
  base = aj.load_model(tiny_with_tokenizer)[0]
  assert summary['trainable_params'] == base.num_layers * base.hidden_size
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [line for line in lines if 'loss' in line]
  assert [line['step'] for line in train_lines] == [1, 2, 3]
  assert all(line['lr/mlp_output_bias'] == pytest.approx(0.02) for line in train_lines)
  assert np.isfinite(summary['eval_loss'])
  assert check_config(config)[1] == (MlpOutputBias(scale=0.5),)


def test_it_counts_saves_reloads_and_decodes(trained, tiny_with_tokenizer, tmp_path):
  config, workdir, _ = trained
  out = export_run(str(workdir), 'aj')  # the run's checkpoint, as our adapter files
  base_config, params = aj.load_model(tiny_with_tokenizer)
  methods, peft = aj.peft.load_adapter(out, base_config)
  assert methods == (MlpOutputBias(scale=0.5),)
  record = json.loads(open(f'{out}/aj_adapter_config.json').read())['methods'][0]
  assert record['method'] == 'MlpOutputBias(scale=0.5)'
  assert record['adapter_type'] == 'mlp_output_bias'
  [count] = count_methods(methods, base_config)
  assert count.formula == count.leaves == base_config.num_layers * base_config.hidden_size
  assert np.abs(peft['mlp_output_bias']['bias_LD']).max() > 1e-3  # it trained

  model = Llama(base_config, peft=methods)
  variables = {'params': params, 'peft': peft}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, base_config.vocab_size, (2, 9)))
  full = model.apply(variables, tokens)
  assert relative_error(full, Llama(base_config).apply({'params': params}, tokens)) > 1e-2
  cache = KVCache.create(base_config, 2, 9)
  logits, cache = model.apply(variables, tokens[:, :5], cache=cache)
  steps = [logits]
  for t in range(5, 9):
    logits, cache = model.apply(variables, tokens[:, t:t + 1], cache=cache)
    steps.append(logits)
  assert relative_error(jnp.concatenate(steps, axis=1), full) < 1e-5
  tokenizer = aj.load_tokenizer(tiny_with_tokenizer)
  assert len(generate(model, variables, tokenizer, ['Review: fine'], max_new_tokens=4,
                      chat=False)) == 1
