"""`python -m additive_jax.generate` end to end: from a run's workdir, from adapter files exported
to HF PEFT's format (two adapters in one batch), and bad input refused with nothing written."""

import json
import os
import subprocess
import sys

import pytest

import additive_jax as aj
from additive_jax.eval.decode import generate
from additive_jax.export import export_run
from additive_jax.train.restore import restore_run
from cli_helpers import ROOT, moving_run
from conftest import save_tiny_hf_llama, xla_flags

PROMPT = 'Review: a gentle, funny and moving film\nSentiment:'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """A 2-step LoRA run at a high learning rate, so that its adapter moves off the identity."""
  return moving_run(tiny_with_tokenizer, small_sst2,
                    aj.peft.LoRA(rank=4, alpha=8, targets=('q', 'v')), tmp_path_factory.mktemp('run'))


def run_generate(*args):
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  return subprocess.run([sys.executable, '-m', 'additive_jax.generate', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def expected(model_path, methods, peft, prompts):
  config, params = aj.load_model(model_path)
  tokenizer = aj.load_tokenizer(model_path)
  return generate(aj.Llama(config, peft=methods), {'params': params, 'peft': peft}, tokenizer,
                  prompts, max_new_tokens=6, chat=False)


def test_a_run_generates_from_its_workdir(workdir, tiny_with_tokenizer):
  result = run_generate(f'--workdir={workdir}', f'--prompt={PROMPT}', '--max_new_tokens=6')
  assert result.returncode == 0, result.stderr[-3000:]
  run = restore_run(workdir)
  [text] = expected(tiny_with_tokenizer, run.methods, run.peft, [PROMPT])
  assert result.stdout == text + '\n'  # streamed, then a line end


def test_adapter_files_of_two_formats_generate_in_one_batch(workdir, tiny_with_tokenizer,
                                                            tmp_path):
  ours = export_run(workdir, 'aj', out=str(tmp_path / 'ours'))
  theirs = export_run(workdir, 'hf_peft', out=str(tmp_path / 'peft'))
  base, _ = aj.load_model(tiny_with_tokenizer)
  methods, peft = aj.peft.load_adapter(theirs, base)
  bigger = {'lora': {t: {k: v * 3 for k, v in leaves.items()} for t, leaves in peft['lora'].items()}}
  aj.peft.save_adapter(str(tmp_path / 'bigger'), methods, bigger, base, format='hf_peft')
  prompts = tmp_path / 'prompts.jsonl'
  rows = [{'prompt': PROMPT, 'adapter': 'ours'}, {'prompt': 'The film was', 'adapter': 'bigger'},
          {'prompt': PROMPT, 'adapter': 'bigger'}]
  prompts.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  out = tmp_path / 'answers.jsonl'
  result = run_generate(f'--model={tiny_with_tokenizer}', f'--adapter=ours={ours}',
                        f'--adapter=bigger={tmp_path / "bigger"}', f'--prompts={prompts}',
                        f'--output={out}', '--max_new_tokens=6')
  assert result.returncode == 0, result.stderr[-3000:]
  answers = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(a['prompt'], a['adapter']) for a in answers] == [(r['prompt'], r['adapter']) for r in rows]
  [mine] = expected(tiny_with_tokenizer, methods, peft, [PROMPT])
  big = expected(tiny_with_tokenizer, methods, bigger, ['The film was', PROMPT])
  assert [a['completion'] for a in answers] == [mine] + big


def test_bad_input_is_one_line_and_writes_nothing(workdir, tiny_with_tokenizer, tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(json.dumps({'prompt': 'x', 'adapter': 'run'}) + '\n' +
                     json.dumps({'prompt': 'y', 'adapter': 'other'}) + '\n')
  out = tmp_path / 'answers.jsonl'
  result = run_generate(f'--workdir={workdir}', f'--prompts={prompts}', f'--output={out}')
  assert result.returncode != 0
  assert result.stderr.strip() == (f"error: {prompts}:2: adapter 'other' is not loaded "
                                   '(loaded: run)')
  assert not out.exists() and not os.path.exists(str(out) + '.tmp')
  result = run_generate(f'--workdir={workdir}', '--prompt=x', '--temperature=1', '--top_p=1.5')
  assert result.stderr.strip() == 'error: top_p must lie in (0, 1] (1: no cut), got 1.5'
  other_base = tmp_path / 'other_base'
  save_tiny_hf_llama(other_base, vocab_size=4096, hidden_size=60, num_hidden_layers=2)
  result = run_generate(f'--model={other_base}', f'--adapter={export_run(workdir, "aj")}',
                        '--prompt=x')
  assert result.returncode != 0 and result.stderr.count('\n') == 1
  assert 'does not fit this model' in result.stderr and 'hidden_size=48 (this model: 60)' in result.stderr
