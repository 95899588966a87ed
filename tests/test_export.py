"""`python -m additive_jax.export`: a run's checkpoint written in each format reads back with the
checkpoint's values; the merged checkpoint gives the adapted logits; HF PEFT loads the CLI's
export with our logits; bad input gets one line.

Two tiny runs train here, in this process on 8 devices (the export restores onto one): LoRA
(`aj`, `hf_peft`, `merged`) and a Houlsby bottleneck (`aj`, `adapterhub`)."""

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import transformers

import additive_jax as aj
from additive_jax.export import export_run
from additive_jax.model.load import load_config
from additive_jax.peft.files import AdapterFileError
from additive_jax.peft.registry import parse_method
from additive_jax.train.checkpoint import CheckpointError
from additive_jax.train.loop import train_and_evaluate
from adapter_files_helpers import assert_same_leaves, hf_logits, our_logits
from cli_helpers import ROOT, in_process_config
from conftest import relative_error

STEPS = 2
RUNS = {'lora': "LoRA(rank=4, alpha=8, targets=('q', 'v'))",
        'bottleneck': "Bottleneck(dim=8, placement='houlsby')"}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """{name: workdir} of the two runs, trained with a constant, high learning rate so that the
  adapters move well away from their identity init in two steps."""
  workdirs = {}
  for name, method in RUNS.items():
    config = in_process_config(tiny_with_tokenizer, small_sst2, [parse_method(method)])
    config.seq_len, config.num_steps, config.checkpoint_every = 32, STEPS, STEPS
    config.peft[name].optimizer.learning_rate = 0.05
    config.peft[name].optimizer.schedule = 'constant'
    workdirs[name] = str(tmp_path_factory.mktemp(name))
    train_and_evaluate(config, workdirs[name])
  return workdirs


@pytest.fixture(scope='module')
def tiny(tiny_with_tokenizer):
  """(our config, our params, the HF model) of the tiny base."""
  config, params = aj.load_model(tiny_with_tokenizer)
  return config, params, transformers.LlamaForCausalLM.from_pretrained(tiny_with_tokenizer).eval()


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(0).randint(0, 49152, (2, 7))


def saved_peft(workdir):
  """The trainables as the checkpoint holds them, read by Orbax alone (no abstract state)."""
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(STEPS), 'state'))
  return jax.tree.map(np.asarray, state['peft'])


@pytest.mark.parametrize('run, format', [('lora', 'aj'), ('lora', 'hf_peft'), ('lora', 'adapterhub'),
                                         ('bottleneck', 'aj'), ('bottleneck', 'adapterhub')])
def test_an_export_reads_back_with_the_checkpoints_values(runs, tiny, tmp_path, run, format):
  config, *_ = tiny
  out = export_run(runs[run], format, out=str(tmp_path / format))
  methods, loaded = aj.peft.load_adapter(out, config)
  assert methods == (parse_method(RUNS[run]),)
  assert_same_leaves(loaded, saved_peft(runs[run]))


def test_the_merged_export_gives_the_adapted_logits(runs, tiny, tokens):
  config, params, _ = tiny
  out = export_run(runs['lora'], 'merged')
  assert out == os.path.join(runs['lora'], 'export', f'merged_{STEPS}')
  merged_config, merged_params = aj.load_model(out)
  merged = our_logits(merged_config, merged_params, (), {}, tokens)
  adapted = our_logits(config, params, (parse_method(RUNS['lora']),), saved_peft(runs['lora']),
                       tokens)
  assert relative_error(our_logits(config, params, (), {}, tokens), adapted) > 1e-3  # LoRA acts
  assert relative_error(merged, adapted) <= 1e-5


def test_the_cli_export_loads_in_peft_with_our_logits(runs, tiny, tokens):
  config, params, hf_model = tiny
  result = subprocess.run([sys.executable, '-m', 'additive_jax.export', f'--workdir={runs["lora"]}',
                           '--format=hf_peft'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = os.path.join(runs['lora'], 'export', f'hf_peft_{STEPS}')
  assert result.returncode == 0 and result.stdout.strip() == f'wrote {out}', result.stderr[-3000:]
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), out).eval()
  ours = our_logits(config, params, (parse_method(RUNS['lora']),), saved_peft(runs['lora']), tokens)
  assert relative_error(hf_logits(peft_model, tokens), hf_logits(hf_model, tokens)) > 1e-3
  assert relative_error(ours, hf_logits(peft_model, tokens)) <= 1e-5


def test_a_format_the_methods_cannot_take_is_one_line_from_the_cli(runs):
  result = subprocess.run([sys.executable, '-m', 'additive_jax.export',
                           f'--workdir={runs["bottleneck"]}', '--format=hf_peft'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: Bottleneck(dim=8, placement='houlsby') has no Hugging Face PEFT equivalent (PEFT files "
      'hold LoRA, (IA)³, prompt tuning, P-tuning, prefix tuning or adaption prompts); use '
      'format="aj" or "adapterhub"')
  assert not os.path.exists(os.path.join(runs['bottleneck'], 'export'))  # nothing half-written


@pytest.mark.parametrize('run, format, step, error, message', [
    (None, 'aj', None, CheckpointError, 'has no checkpoints folder'),
    ('lora', 'aj', 7, CheckpointError, r'has no checkpoint of step 7 \(it has steps \[2\]\)'),
    ('bottleneck', 'merged', None, AdapterFileError, r'cannot be folded into the base weights'),
])
def test_bad_input_is_named(runs, tmp_path, run, format, step, error, message):
  workdir = runs[run] if run else str(tmp_path)
  with pytest.raises(error, match=message):
    export_run(workdir, format, step, out=str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == []  # no output, no partial folder


def test_a_failure_while_writing_is_refused_by_readers_and_a_rerun_completes_it(
    runs, tmp_path, monkeypatch, tiny_with_tokenizer):
  out = tmp_path / 'out'
  export_run(runs['lora'], 'aj', out=str(out))
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  assert 'COMPLETE.json' in before

  def fails_half_way(directory, *args, **kwargs):
    (open(os.path.join(directory, 'adapter_model.safetensors'), 'wb')).write(b'half')
    raise OSError('disk full')

  calls = []
  real = aj.peft.save_adapter
  def save(directory, *args, **kwargs):  # the check before restoring passes; the write fails
    calls.append(directory)
    return real(directory, *args, **kwargs) if len(calls) == 1 else fails_half_way(directory)
  monkeypatch.setattr('additive_jax.export.save_adapter', save)
  with pytest.raises(OSError, match='disk full'):
    export_run(runs['lora'], 'aj', out=str(out))
  assert len(calls) == 2
  with pytest.raises(AdapterFileError, match=f'^{out} is half-written: a write of it did not'):
    aj.peft.load_adapter(str(out), load_config(tiny_with_tokenizer))
  monkeypatch.setattr('additive_jax.export.save_adapter', real)
  export_run(runs['lora'], 'aj', out=str(out))
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
