"""Shared fixtures and constants: SmolLM2 loaded once per session, tiny random HF checkpoints,
the Llama 3.2 configs whose published trainable counts the tests check."""

import os
import sys

# experiments/ (the sweep, the report: commands run from the checkout, not part of the
# package) importable by the tests; appended, so that the installed additive_jax still comes
# first under PYTHONSAFEPATH=1.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Eight host CPU devices for the sharding tests; a single-device test simply uses
# the first. Must be set before JAX initializes its backend.
#
# The tests compile with LLVM's optimization of the machine code off (level 0). XLA's own passes
# over the program (fusion, layout, sharding, buffer assignment) all still run, so the tests
# check the programs a run executes; what level 0 gives up is the speed of the code, which the
# suite does not measure (benchmarks/ does, at the default level). It halves most tests'
# compile time, which is most of the suite's time on 2 cores.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process the tests start: `devices` host CPU devices, compiled as the
  tests' own programs are."""
  return f'{FAST_COMPILE} --xla_force_host_platform_device_count={devices}'


os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()

# JAX's persistent compilation cache, through the environment so that the subprocesses the
# tests start (the CLI, multi-process runs) share it too. Every program is kept, however quick
# its compilation: the tiny model's are 0.1–0.5 s each, about 20 of them a run, and the CLI
# tests start dozens of runs of the same programs (a cached one loads in about 10 ms).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.expanduser('~'), '.cache', 'additive_jax', 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402

from additive_jax.model.config import LlamaConfig  # noqa: E402

SMOLLM2 = 'smollm2-135m-instruct'
# The real data, ../shared/data beside the checkout (where the trainer looks by default when it
# runs from the checkout's root, as the tests do).
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))

# Llama 3.2 1B and 3B as their config.json files describe them (counts need no weights).
LLAMA_3_2_1B_HF = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
                   'vocab_size': 128256, 'hidden_size': 2048, 'intermediate_size': 8192,
                   'num_hidden_layers': 16, 'num_attention_heads': 32, 'num_key_value_heads': 8,
                   'head_dim': 64, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': True,
                   'rope_theta': 500000.0, 'max_position_embeddings': 131072,
                   'rope_scaling': {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                                    'high_freq_factor': 4.0,
                                    'original_max_position_embeddings': 8192}}
LLAMA_3_2_3B_HF = dict(LLAMA_3_2_1B_HF, hidden_size=3072, num_hidden_layers=28,
                       num_attention_heads=24, head_dim=128)
LLAMA_3_2_1B = LlamaConfig.from_hf(LLAMA_3_2_1B_HF)
LLAMA_3_2_3B = LlamaConfig.from_hf(LLAMA_3_2_3B_HF)

# The tiny Llama of the tests. Every size is unique, so that a tensor's shape says what it is:
# D 48, F 80, N·H 6·8, K·H 2·8 (GQA), V 101, L 3; F = 80 and H = 8 appear nowhere else, not even
# in a ladder side network of reduction 2 (R 24, F/r 40, H/r 4). It is the model
# `save_tiny_hf_llama` writes by default, as transformers configures it (`tiny_hf_llama`'s config
# equals it). A test that needs other sizes derives them with `TINY.replace(...)`.
TINY = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
                   num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)


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


@pytest.fixture(scope='session')
def smollm2_torch(smollm2_gguf):
  """The embedded SmolLM2-135M-Instruct as transformers reads the GGUF (fp32, eval mode): the
  reference model of every SmolLM2 parity test. Shared, so deep-copy it before wrapping it."""
  import os
  import torch
  import transformers
  folder, name = os.path.split(smollm2_gguf)
  return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).eval()


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
def tiny_hf_llama(tmp_path_factory):
  """(HF model, our config, our params) of one random Llama of `save_tiny_hf_llama`'s defaults:
  our config is `TINY`.

  Many test files share it, so none may change it: the params are read-only arrays, and the
  torch model is run under `torch.no_grad` and deep-copied before PEFT wraps it."""
  import jax
  from additive_jax.model.hf_checkpoint import load_hf_directory
  directory = tmp_path_factory.mktemp('tiny_llama')
  hf_model = save_tiny_hf_llama(directory)
  config, params = load_hf_directory(str(directory))
  assert config == TINY, config  # the two descriptions of the tiny model agree
  for leaf in jax.tree.leaves(params):
    leaf.flags.writeable = False
  return hf_model, config, params


def free_port() -> int:
  """A free TCP port on localhost, for a `jax.distributed` coordinator."""
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


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
  directory = tmp_path_factory.mktemp('data')
  os.makedirs(directory / 'sst2')
  for split in ('train', 'dev', 'test'):
    with open(os.path.join(SHARED_DATA, 'sst2', f'{split}.tsv'), encoding='utf-8') as f:
      rows = [next(f) for _ in range(201)]  # the header and the first 200 rows
    (directory / 'sst2' / f'{split}.tsv').write_text(''.join(rows), encoding='utf-8')
  return str(directory)
