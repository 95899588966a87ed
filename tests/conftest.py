"""Shared fixtures: SmolLM2 loaded once per session, tiny random HF checkpoints."""

import os

# Eight host CPU devices for the sharding tests; a single-device test simply uses
# the first. Must be set before JAX initializes its backend.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

# JAX's persistent compilation cache, through the environment so that the subprocesses the
# tests start (the CLI, multi-process runs) share it too.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.expanduser('~'), '.cache', 'additive_jax', 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # noqa: E402

SMOLLM2 = 'smollm2-135m-instruct'


@pytest.fixture(scope='session')
def smollm2():
  """(config, params) of the embedded SmolLM2-135M-Instruct."""
  import additive_jax as aj
  return aj.load_model(SMOLLM2)


@pytest.fixture(scope='session')
def smollm2_tokenizer():
  import additive_jax as aj
  return aj.load_tokenizer(SMOLLM2)


@pytest.fixture(scope='session')
def smollm2_gguf():
  from additive_jax.model import embedded
  return embedded.smollm2_gguf()


def save_tiny_hf_llama(directory, seed=0, **overrides):
  """Writes a random `LlamaForCausalLM` checkpoint and returns the torch model."""
  import torch
  import transformers
  settings = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
  settings.update(overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
  model.save_pretrained(directory)
  return model
