"""The trainer end to end: `python -m additive_jax.main` and bad configs refused before any compute.
(Two `jax.distributed` processes training as one: test_checkpoint_resume.py's elastic test.)"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from additive_jax.model.load import load_config
from additive_jax.peft.param_count import count_leaves
from additive_jax.peft.registry import presets
from additive_jax.train.config_checks import check_config
from cli_helpers import ROOT, experiment_config, run_main, sst2_config
from conftest import xla_flags

# The method each preset names, by its key.
PRESET_KEYS = {'pfeiffer': 'bottleneck', 'houlsby': 'bottleneck', 'parallel': 'bottleneck',
               'ia3': 'ia3', 'lora': 'lora', 'prompt': 'prompt', 'prefix': 'prefix', 'ladder': 'ladder',
               'loreft': 'reft', 'direft': 'reft', 'ptuning': 'ptuning',
               'compacter': 'compacter', 'compacterpp': 'compacter',
               'adaption_prompt': 'adaption_prompt'}


def test_main_trains_evaluates_logs_and_checkpoints(tmp_path, tiny_with_tokenizer, small_sst2):
  data = f'--config.data.data_dir={small_sst2}'
  result = run_main(tmp_path, f'--config.model={tiny_with_tokenizer}', data,
                    '--config.peft.bottleneck.optimizer.learning_rate=0.003')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0].split() == ['method', 'trainable', '%', 'of', 'base', 'fp32', 'bf16']
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert {'accuracy_before', 'accuracy_after', 'eval_loss', 'final_loss'} <= set(summary)
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in lines if 'loss' in m] == [1, 2, 3, 4]
  assert all(np.isfinite(m['loss']) and m['tokens_per_s'] > 0 and m['model_tflops_per_s'] > 0
             and m['loss_overflows'] == 0 for m in lines if 'loss' in m)
  assert lines[0] == {'step': 0, 'accuracy': summary['accuracy_before']}
  assert lines[-1] == {'step': 4, 'accuracy': summary['accuracy_after']}
  assert {'lr/bottleneck', 'grad_norm', 'trainable_params', 'pad_fraction'} <= set(lines[1])
  assert max(m['lr/bottleneck'] for m in lines if 'loss' in m) == pytest.approx(0.003)
  assert [m['step'] for m in lines if 'eval_loss' in m] == [2, 4]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'tensorboard'))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  # what a user reads is printed once, on stdout; the log (stderr) holds no INFO line
  assert 'accuracy before: ' in result.stdout and 'accuracy after: ' in result.stdout
  assert 'step 2: eval_loss ' in result.stdout
  assert not re.search(r'^I\d{4} ', result.stderr, re.M), result.stderr[-3000:]
  # The same command again resumes the finished run: no step is trained, the accuracy before
  # training is the one logged at step 0, not a score of the trained adapter.
  again = run_main(tmp_path, f'--config.model={tiny_with_tokenizer}', data,
                   '--config.peft.bottleneck.optimizer.learning_rate=0.003')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step 4' in again.stdout
  resumed = json.loads((tmp_path / 'summary.json').read_text())
  assert resumed['accuracy_before'] == summary['accuracy_before']
  assert resumed['accuracy_after'] == summary['accuracy_after']
  assert [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
          if 'loss' in json.loads(line)] == [1, 2, 3, 4]


@pytest.mark.parametrize('override, message', [
    ('--config.learning_rat=1e-3',
     "error: --config.learning_rat: the config has no key 'learning_rat'; the nearest is "
     'config.peft.bottleneck.optimizer.learning_rate'),
    ('--config.peft.bottleneck.dimm=16',
     "error: --config.peft.bottleneck.dimm: the config has no key 'peft.bottleneck.dimm'; the "
     'nearest is config.peft.bottleneck.dim'),
    # a setting of a method the run does not train is refused, not silently ignored
    ('--config.peft.lora.optimizer.learning_rate=2e-4',
     "error: --config.peft.lora.optimizer.learning_rate: this run does not train 'lora' "
     '(config.peft has bottleneck); name its preset in the config argument, e.g. '
     '--config=FILE:lora'),
    ('--config.optimizer.lora.learning_rate=2e-4',
     "error: --config.optimizer.lora.learning_rate: the config has no key "
     "'optimizer.lora.learning_rate'; the nearest is config.peft.bottleneck.optimizer.learning_rate"),
])
def test_a_bad_config_key_is_one_line_naming_the_nearest(tmp_path, override, message):
  result = run_main(tmp_path, override)
  assert result.returncode != 0
  assert result.stderr.strip() == message


@pytest.mark.parametrize('changes, error, message', [
    ({'mesh': (3, -1, 1)}, ValueError, r'config.mesh: mesh shape \[3, -1, 1\] does not divide the 8'),
    ({'mesh': (4, 2, 1), 'batch_size': 4}, ValueError, r'batch_size=4 is not divisible by the 8 ways'),
    ({'accumulation': 3}, ValueError, r'accumulation=3 does not divide the 1 rows'),
    ({'data.split': 'validation'}, ValueError,
     r"config.data.split='validation': sst2 has no split 'validation'"),
    ({'dtype': 'float16'}, ValueError, r'config.dtype must be one of float32, bfloat16'),
    ({'peft.bottleneck.dim': 9999}, ValueError, r'exceeds the hidden size 576'),
    ({'peft.bottleneck.placement': 'after'}, ValueError,
     r"config.peft.bottleneck: Bottleneck placement must be one of"),
    ({'peft.bottleneck.optimizer': {'lr': 1.0}}, ValueError,
     r"config.peft.bottleneck.optimizer has unknown keys \['lr'\]"),
    ({'peft.bottleneck.optimizer.schedule': 'linear'}, ValueError,
     r'config.peft.bottleneck.optimizer.schedule must be one of cosine'),
    ({'accumulation': 0}, ValueError, r'config.accumulation must be an integer ≥ 1, got 0'),
    ({'batch_size': -8}, ValueError, r'config.batch_size must be an integer ≥ 1'),
    ({'mesh': (0, -1, 1)}, ValueError, r'config.mesh: .* each entry is a positive size'),
    ({'remat': 'some'}, ValueError, r'config.remat must be one of none, full, dots'),
    ({'data.template': 'chatml'}, ValueError, r'config.data.template must be one of plain, chat'),
    ({'data.over_long': 'skip'}, ValueError, r'config.data.over_long must be one of truncate, drop'),
    ({'data.source.name': 'gsm8k', 'data.eval_split': 'test'}, ValueError,
     r"config.test_metric='accuracy' needs a classification source"),
    ({'base_quant': 'int3'}, ValueError, r"config.base_quant='int3': one of \('none', 'int8'"),
    ({'base_quant': 'nf4', 'base_quant_block': 7}, ValueError,
     r'config.base_quant_block=7: embed_tokens/embedding sums over 576 values, which blocks of 7'),
    ({'base_quant': 'gguf', 'base_quant_block': 64}, ValueError,
     r"config.base_quant_block=64: a GGUF file's blocks are 32 long"),
    ({'base_quant_block': -32}, ValueError, r'config.base_quant_block must be an integer ≥ 0'),
])
def test_bad_configs_are_refused_before_any_compute(changes, error, message):
  config = sst2_config()
  config.batch_size = 8  # one row for each of the 8 devices
  with config.unlocked():
    for key, value in changes.items():
      *parents, name = key.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[name] = value
  with pytest.raises(error, match=message):
    check_config(config)


def test_a_missing_data_file_is_named(tmp_path):
  config = sst2_config()
  config.batch_size = 8
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=f'no data file {tmp_path}/sst2/train.tsv'):
    check_config(config)


@pytest.mark.parametrize('config_file', ['sst2', 'gsm8k'])
def test_every_method_preset_of_every_config_passes_the_checks(config_file):
  """Each experiment (config × method preset) is valid before any weight is read; it trains the
  method its preset names, the same with `runlocal` (which only shrinks the run), and a share
  of its base (SmolLM2) that PEFT trains: from 0.005% (a 20-vector prompt) to 3% (the ladder)."""
  built_in = [name for name, (cls, _) in presets().items() if cls.__module__.startswith('additive_jax.')]
  assert sorted(built_in) == sorted(PRESET_KEYS)
  for name, key in PRESET_KEYS.items():
    checked = []
    for arg in (name, f'{name},runlocal'):
      config = experiment_config(config_file, arg)
      config.batch_size = 8  # the test process has 8 devices
      checked.append(check_config(config)[1])
    methods, smoke_methods = checked
    assert [m.key for m in methods] == [key] and smoke_methods == methods, name
    if key == 'bottleneck':
      assert methods[0].placement == name
    base = load_config(config.model)
    share = count_leaves(methods, base)[key] / base.num_base_params
    assert 5e-5 <= share <= 0.03, (name, share)
  with pytest.raises(ValueError, match='unknown method preset'):
    experiment_config(config_file, 'adapter')


def test_combinations_configure_their_methods_and_a_sequence_gate_is_refused():
  """`configs/sst2.py:mam` and `:unipelt` train AdapterHub's MAMConfig and UniPELTConfig
  methods (peft/combinations.py), each with its own optimizer block; UniPELT with AdapterHub's
  own gate, averaged over the whole sequence, is refused before anything loads."""
  for name, keys in (('mam', ['bottleneck', 'prefix']), ('unipelt', ['bottleneck', 'lora', 'prefix'])):
    config = experiment_config('sst2', name)
    config.batch_size = 8  # the test process has 8 devices
    methods = check_config(config)[1]
    assert sorted(m.key for m in methods) == keys, name
    assert all('learning_rate' in config.peft[key].optimizer for key in keys)
  assert {m.key: m.gate for m in methods} == {'prefix': 'token', 'bottleneck': 'token',
                                               'lora': 'token'}
  config = experiment_config('sst2', 'unipelt')
  config.batch_size = 8
  config.peft.lora.gate = 'sequence'
  with pytest.raises(ValueError, match=r"config.peft.lora: LoRA\(.*gate='sequence'\) reads every "
                                       r"token of the sequence at each token .*train with gate='token'"):
    check_config(config)
  with pytest.raises(ValueError, match="presets 'mam' and 'unipelt' both configure"):
    experiment_config('sst2', 'mam,unipelt')


def test_gsm8k_smoke_run_with_the_chat_template(tmp_path, tiny_with_tokenizer):
  result = subprocess.run(
      [sys.executable, '-m', 'additive_jax.main', '--config=configs/gsm8k.py:prefix,runlocal',
       f'--workdir={tmp_path}', f'--config.model={tiny_with_tokenizer}', '--config.seq_len=128',
       '--config.data.over_long=drop'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'XLA_FLAGS': xla_flags(1)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'dropped' in result.stdout
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert np.isfinite(summary['final_loss']) and np.isfinite(summary['eval_loss'])
