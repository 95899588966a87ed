"""Task metrics end to end: a classification TSV of the user's own trains from a config file
alone and reports accuracy before and after; exact match through generation equals the
extractor on the model's own outputs; perplexity against transformers; the evaluate command
reproduces a run's own final accuracy; bad metric settings are named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import additive_jax as aj
from additive_jax.data.config import data_config
from additive_jax.data.pipeline import make_eval_batches
from additive_jax.eval.exact_match import Extractor
from additive_jax.eval.decode import generate
from additive_jax.eval.metrics import Settings, score
from additive_jax.eval.subsets import subset
from additive_jax.model.llama import Llama
from additive_jax.train.config_checks import check_config
from cli_helpers import ROOT, sst2_config
from conftest import SHARED_DATA, xla_flags

# Four topics whose words take two or more tokens, two of them sharing the first (' World').
LABELS = {'1': ' World News', '2': ' World Sports', '3': ' Business News', '4': ' Science Desk'}
HEADLINES = ['Stocks rally after earnings', 'Local team wins the cup', 'New chip doubles speed',
             'Summit ends without a deal', 'Striker signs for rivals', 'Bank raises its rates']
CONFIG_FILE = '''
from additive_jax.train.config import default_config, with_methods


def get_config(arg=None):
  c = with_methods(default_config(), 'ia3')
  s = c.data.source
  s.name, s.format, s.columns = 'news', 'tsv', ('label', 'headline')
  s.files.train, s.files.dev, s.files.test = 'news/train.tsv', 'news/dev.tsv', 'news/test.tsv'
  s.prompt, s.response = 'Headline: {{headline}}\\nTopic:', '{{label}}'
  s.labels = {{'label': {labels!r}}}
  c.data.eval_split = 'dev'
  c.test_metric, c.test_split = 'accuracy', 'test'
  c.model = {model!r}
  c.batch_size, c.seq_len, c.num_steps = 2, 32, 3
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 3, 1, 3
  c.lock()
  return c
'''


@pytest.fixture(scope='module')
def news_run(tmp_path_factory, tiny_with_tokenizer):
  """(workdir, config file, summary) of 3 steps on a headline TSV with no header."""
  root = tmp_path_factory.mktemp('news')
  (root / 'data' / 'news').mkdir(parents=True)
  rng = np.random.RandomState(0)
  for split, rows in (('train', 24), ('dev', 6), ('test', 12)):
    lines = [f'{rng.randint(1, 5)}\t{HEADLINES[rng.randint(len(HEADLINES))]}' for _ in range(rows)]
    (root / 'data' / 'news' / f'{split}.tsv').write_text('\n'.join(lines) + '\n')
  config_file = root / 'news.py'
  config_file.write_text(CONFIG_FILE.format(labels=LABELS, model=tiny_with_tokenizer))
  workdir = root / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'additive_jax.main', f'--config={config_file}', f'--workdir={workdir}',
       f'--config.data.data_dir={root / "data"}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env={**os.environ, 'XLA_FLAGS': xla_flags(1)})
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, config_file, json.loads((workdir / 'summary.json').read_text()), root / 'data'


def test_a_headline_tsv_trains_and_reports_accuracy_before_and_after(news_run):
  _, _, summary, _ = news_run
  assert 0 <= summary['accuracy_before'] <= 1 and 0 <= summary['accuracy_after'] <= 1
  assert summary['trainable_params'] > 0


def test_the_evaluate_command_reproduces_the_runs_final_accuracy(news_run):
  workdir, _, summary, data = news_run
  result = subprocess.run(
      [sys.executable, '-m', 'additive_jax.evaluate', f'--workdir={workdir}', '--split=test',
       '--metric=accuracy,perplexity'], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'XLA_FLAGS': xla_flags(1),
           'ADDITIVE_JAX_DATA': str(data)})
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / 'eval_test.json').read_text())
  assert record['results']['accuracy']['accuracy'] == summary['accuracy_after']
  assert record['results']['accuracy']['rows'] == 12 and record['step'] == 3
  assert record['results']['perplexity']['perplexity'] > 1
  lines = result.stdout.splitlines()
  assert lines[0].startswith(f'accuracy on test: {summary["accuracy_after"]:.4f} (rows 12)')
  assert lines[1].startswith('perplexity on test: ')


def test_exact_match_through_generation_is_the_extractor_on_the_models_own_outputs(
    tiny_with_tokenizer):
  config, params = aj.load_model(tiny_with_tokenizer)
  tokenizer = aj.load_tokenizer(tiny_with_tokenizer)
  data = data_config()
  data.source.name, data.data_dir = 'gsm8k', SHARED_DATA
  settings = Settings(batch_size=4, max_new_tokens=12)
  model, variables = Llama(config), {'params': params}
  result = score('exact_match', model, variables, tokenizer, data, 'test', limit=6,
                 settings=settings)
  with open(os.path.join(SHARED_DATA, 'gsm8k', 'test.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  chosen = [rows[i] for i in subset(len(rows), 6)]
  outputs = generate(model, variables, tokenizer,
                     [f'Question: {r["question"]}\nAnswer:' for r in chosen], max_new_tokens=12,
                     chat=False)
  extract = Extractor()
  hits = [extract(o) is not None and extract(o) == extract(r['answer'])
          for o, r in zip(outputs, chosen)]
  assert result == {'exact_match': sum(hits) / 6, 'rows': 6}


def test_perplexity_is_that_of_transformers_on_the_response_tokens(tiny_with_tokenizer, small_sst2):
  config, params = aj.load_model(tiny_with_tokenizer)
  tokenizer = aj.load_tokenizer(tiny_with_tokenizer)
  data = data_config()
  data.data_dir, data.eval_split = small_sst2, 'test'
  result = score('perplexity', Llama(config), {'params': params}, tokenizer, data, 'test',
                 limit=8, settings=Settings(batch_size=4, seq_len=64))
  batches, _ = make_eval_batches(data, tokenizer, batch_size=4, seq_len=64)
  hf_model = transformers.LlamaForCausalLM.from_pretrained(tiny_with_tokenizer).eval()
  sums, counts = [], []
  for index in range(2):  # ceil(8 / 4) batches of one example a row
    batch = batches[index]
    for row in range(4):
      mask = batch['loss_mask'][row].astype(bool)
      length = int((batch['segment_ids'][row] > 0).sum())
      with torch.no_grad():
        logits = hf_model(torch.tensor(batch['tokens'][row:row + 1, :length])).logits[0].double()
      nll = -torch.log_softmax(logits, -1)[torch.arange(length),
                                            torch.tensor(batch['targets'][row, :length])]
      sums.append(float(nll[torch.tensor(mask[:length])].sum()))
      counts.append(int(mask.sum()))
  sums, counts = np.array(sums), np.array(counts)
  assert result['examples'] == 8 and result['tokens'] == counts.sum()
  np.testing.assert_allclose(result['perplexity'], np.exp(sums.sum() / counts.sum()), rtol=1e-5)
  np.testing.assert_allclose(result['perplexity_per_example'], np.mean(np.exp(sums / counts)),
                             rtol=1e-5)


@pytest.mark.parametrize('changes, message', [
    ({'test_metric': 'bleu'}, r"config.test_metric: unknown metric 'bleu' \(metrics: accuracy, "),
    ({'eval_metric': 'rouge'}, r"config.eval_metric: unknown metric 'rouge'"),
    ({'answer_regex': '(unclosed'}, r"config.answer_regex: the answer regex '\(unclosed' does not"),
    ({'test_split': ''}, r"config.test_metric='accuracy' needs config.test_split"),
    ({'max_new_tokens': 0}, r'config.max_new_tokens must be an integer ≥ 1'),
])
def test_bad_metric_settings_are_named(changes, message):
  config = sst2_config()
  config.batch_size = 8
  for key, value in changes.items():
    config[key] = value
  with pytest.raises(ValueError, match=message):
    check_config(config)
