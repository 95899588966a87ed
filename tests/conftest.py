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


def relative_error(ours, ref) -> float:
  """max|ours − ref| / max|ref|, the project's measure of agreement with a reference."""
  import numpy as np
  return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


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


@pytest.fixture(scope='session')
def tiny_with_tokenizer(tmp_path_factory, smollm2_tokenizer):
  """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, as an HF directory: what
  the CLI tests train, since the tokenizer makes the real data pipeline run."""
  directory = tmp_path_factory.mktemp('tiny_tokenizer')
  save_tiny_hf_llama(directory, vocab_size=len(smollm2_tokenizer), num_hidden_layers=2)
  smollm2_tokenizer.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope='session')
def small_sst2(tmp_path_factory):
  """A data folder with the first 200 rows of each SST-2 split (an iterator tokenizes its whole
  split when it is built: the full one takes seconds)."""
  from additive_jax.data.sources import DEFAULT_DATA_DIR
  directory = tmp_path_factory.mktemp('data')
  os.makedirs(directory / 'sst2')
  for split in ('train', 'dev', 'test'):
    with open(os.path.join(DEFAULT_DATA_DIR, 'sst2', f'{split}.tsv'), encoding='utf-8') as f:
      rows = [next(f) for _ in range(201)]  # the header and the first 200 rows
    (directory / 'sst2' / f'{split}.tsv').write_text(''.join(rows), encoding='utf-8')
  return str(directory)
