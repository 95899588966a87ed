"""Trainable-parameter counts: formula = leaves for every method, and the `count` command."""

import json
import re
import subprocess
import sys

import pytest

from additive_jax.model.config import LlamaConfig
from additive_jax.peft.adaption_prompt import AdaptionPrompt
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.param_count import count_methods
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.ladder import LadderSide
from additive_jax.peft.lora import LoRA
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.peft.ptuning import PTuning
from conftest import LLAMA_3_2_1B_HF, LLAMA_3_2_3B_HF

ALL_TARGETS = "('q', 'k', 'v', 'o', 'gate', 'up', 'down')"


def run_count(tmp_path, hf_config, *methods):
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(hf_config))
  args = [sys.executable, '-m', 'additive_jax.count', f'--config={path}']
  return subprocess.run(args + [f'--peft={m}' for m in methods], capture_output=True, text=True,
                        timeout=120)


def trainable_column(stdout):
  """{row name: trainable count} of the printed table."""
  rows = {}
  for line in stdout.splitlines():
    for name in ('IA3()', 'Bottleneck(', 'LoRA(', 'PrefixTuning(', 'total', 'base model'):
      if line.startswith(name):
        rows[name] = int(line[len(line.split('  ')[0]):].split()[0].replace(',', ''))
  return rows


def test_command_prints_the_published_counts(tmp_path):
  result = run_count(tmp_path, LLAMA_3_2_1B_HF, 'IA3()', 'Bottleneck(dim=64)',
                     f'LoRA(rank=16, alpha=32, targets={ALL_TARGETS})')
  assert result.returncode == 0, result.stderr
  rows = trainable_column(result.stdout)
  assert rows == {'IA3()': 147_456, 'Bottleneck(': 4_228_096, 'LoRA(': 11_272_192,
                  'total': 15_647_744, 'base model': 1_235_814_400}
  assert '0.0119%' in result.stdout and '16.13 MiB' in result.stdout and '8.06 MiB' in result.stdout

  # A text-initialized prompt has the shape of any other: counting needs no tokenizer.
  result = run_count(tmp_path, LLAMA_3_2_1B_HF,
                     "PromptTuning(num_tokens=8, init='text', text='Review:')")
  assert result.returncode == 0, result.stderr
  assert '16,384' in result.stdout  # 8 × 2048

  result = run_count(tmp_path, LLAMA_3_2_3B_HF, 'IA3()', 'PrefixTuning(num_tokens=200)')
  assert result.returncode == 0, result.stderr
  assert trainable_column(result.stdout)['IA3()'] == 286_720  # as HF PEFT reports
  assert trainable_column(result.stdout)['PrefixTuning('] == 11_468_800


@pytest.mark.parametrize('methods, message', [
    (['Adapter(dim=4)'], "unknown method 'Adapter'"),
    (['Bottleneck(dim=0)'], 'dim must be a positive integer'),
    (['Bottleneck(dim=4096)'], 'exceeds the hidden size 2048'),
    (["Bottleneck(dim=8, placement='middle')"], "placement must be one of"),
    (["LoRA(rank=4, targets=('q', 'qkv'))"], "unknown \\['qkv'\\]"),
    (['LadderSide(reduction=3)'], 'hidden_size=2048 is not a multiple of the reduction'),
    (['LadderSide()', 'IA3()'], 'would get no gradient'),
    (['IA3()', 'IA3()'], 'configured twice'),
    (['PromptTuning(num_tokens=200000)'], 'leaves no position'),
])
def test_command_refuses_bad_methods_with_one_clear_line(tmp_path, methods, message):
  result = run_count(tmp_path, LLAMA_3_2_1B_HF, *methods)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert re.search(message, result.stderr.splitlines()[-1]), result.stderr


@pytest.mark.parametrize('config', [LLAMA_3_2_1B_HF, dict(LLAMA_3_2_1B_HF, attention_bias=True,
                                                          mlp_bias=True, tie_word_embeddings=False)],
                         ids=['llama-3.2-1b', 'with-biases-untied'])
def test_formula_equals_leaves_for_every_method(config):
  config = LlamaConfig.from_hf(config)
  methods = [Bottleneck(dim=64), Bottleneck(reduction_factor=16.5, placement='houlsby'),
             Bottleneck(dim=32, placement='parallel'), IA3(), LoRA(rank=8, alpha=16),
             PromptTuning(num_tokens=20), PrefixTuning(num_tokens=30),
             PrefixTuning(num_tokens=30, projection_dim=64), LadderSide(reduction=8),
             AdaptionPrompt(num_tokens=10, num_layers=12),
             PTuning(num_tokens=20, encoder_hidden=128), PTuning(20, 'lstm', 64, encoder_layers=3)]
  for method in methods:
    (count,) = count_methods((method,), config)
    assert count.formula == count.leaves, method
    assert count.percent_of_base == pytest.approx(100 * count.leaves / config.num_base_params)
