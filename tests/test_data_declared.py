"""Declared sources: a data set of one's own from `config.data.source` alone (Python or the
command line), classification with multi-token label words, the Alpaca layout in Jinja2, a
held-out split, a built-in with one key overridden."""

import json

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from additive_jax.data import sources
from additive_jax.data.config import data_config
from additive_jax.data.pipeline import make_eval_batches, make_train_iterator
from additive_jax.data.sources import read_rows, source_spec
from data_helpers import examples_of

EOS = 2
# Four topics, each label word two tokens; ' business news' and ' business technology' share
# their first token (' business', 1861), as AG News's Business and Sci/Tech might.
NEWS_LABELS = {'1': ' world news', '2': ' sports news', '3': ' business news',
               '4': ' business technology'}
NEWS_WORD_IDS = {'1': [905, 3661], '2': [5288, 3661], '3': [1861, 3661], '4': [1861, 1835]}
NEWS_TRAIN = ('3\tStocks rally after earnings \tShares rose on Wall Street.\n'
              '2\tLocal team wins the cup\tFans celebrated downtown.\n'
              '4\tNew chip doubles battery life\tThe design uses less power.\n'
              '1\tLeaders meet for peace talks\tThe summit opens on Monday.\n')
NEWS_TEST = ('4\tA faster phone arrives\tIt ships in May.\n'
             '1\tElection results are in\tTurnout was high.\n')

# The Alpaca layout: its "### Input:" section, and the words that announce it, only when the
# row's input is not empty.
ALPACA_PROMPT = (
    'Below is an instruction that describes a task{% if input %}, paired with an input that '
    'provides further context{% endif %}. Write a response that appropriately completes the '
    'request.\n\n### Instruction:\n{{ instruction }}\n\n'
    '{% if input %}### Input:\n{{ input }}\n\n{% endif %}### Response:\n')
ALPACA_ROWS = [{'instruction': 'Give a synonym of happy.', 'input': '', 'output': 'Glad.'},
               {'instruction': 'Add the numbers.', 'input': '2 and 3', 'output': '5.'}]
ALPACA_PROMPTS = (  # the rows' prompts as Alpaca writes them
    'Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request.\n\n### Instruction:\nGive a synonym of happy.\n\n### Response:\n',
    'Below is an instruction that describes a task, paired with an input that provides '
    'further context. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n')
ALPACA_RESPONSE_IDS = ([10484, 344, 30], [37, 30])  # 'Gl' 'ad' '.', '5' '.'


def news_declaration(config):
  source = config.source
  source.name, source.format, source.columns = 'news', 'tsv', ('label', 'title', 'description')
  source.files.train, source.files.test = 'news/train.tsv', 'news/test.tsv'
  source.prompt = 'Headline: {title}\n{description}\nTopic:'
  source.response = '{label}'
  source.labels = {'label': NEWS_LABELS}
  return config


def write_news(directory):
  (directory / 'news').mkdir()
  (directory / 'news' / 'train.tsv').write_text(NEWS_TRAIN)
  (directory / 'news' / 'test.tsv').write_text(NEWS_TEST)


def news_config(directory, **overrides):
  config = news_declaration(data_config())
  config.data_dir, config.eval_split = str(directory), 'test'
  config.update(overrides)
  return config


def test_the_label_words_are_several_tokens_and_two_share_the_first(smollm2_tokenizer):
  encode = lambda text: smollm2_tokenizer.backend_tokenizer.encode(
      text, add_special_tokens=False).ids
  assert {value: encode(word) for value, word in NEWS_LABELS.items()} == NEWS_WORD_IDS


def test_a_headerless_tsv_reads_and_renders_from_its_declaration(tmp_path):
  write_news(tmp_path)
  spec = source_spec(news_config(tmp_path).source)
  assert list(spec.splits) == ['train', 'test'] and spec.label_field == 'label'
  rows = list(read_rows(spec, str(tmp_path), 'train'))
  assert [row.line for row in rows] == [1, 2, 3, 4]  # no header line
  assert rows[0].prompt == 'Headline: Stocks rally after earnings\nShares rose on Wall Street.\nTopic:'
  assert [row.response for row in rows] == [NEWS_LABELS[v] for v in '3241']
  # the raw fields, for metrics: the label value as the file has it, nothing stripped
  assert rows[0].fields == {'label': '3', 'title': 'Stocks rally after earnings ',
                            'description': 'Shares rose on Wall Street.'}
  # a classification row rendered with each label value in turn: the choices to score
  choices = [sources.render_pair(spec, {**rows[0].fields, 'label': value}, 'row')[1]
             for value in spec.labels['label']]
  assert choices == list(NEWS_LABELS.values())


def test_train_and_eval_batches_of_a_declared_source(smollm2_tokenizer, tmp_path):
  write_news(tmp_path)
  config = news_config(tmp_path, packing=False, num_epochs=1)
  cache = str(tmp_path / 'cache')
  iterator, report = make_train_iterator(config, smollm2_tokenizer, batch_size=2, seq_len=32,
                                         seed=0, cache_dir=cache)
  batches = list(iterator)
  assert report.kept == 4 and len(batches) == 2
  learned = sorted(tuple(batch['targets'][row][batch['loss_mask'][row] == 1])
                   for batch in batches for row in range(2))
  assert learned == sorted(tuple(ids + [EOS]) for ids in NEWS_WORD_IDS.values())
  evaluation, report = make_eval_batches(config, smollm2_tokenizer, batch_size=2, seq_len=32,
                                         cache_dir=cache)
  assert report.kept == 2 and len(evaluation) == 1
  first = evaluation[0]
  np.testing.assert_array_equal(first['targets'][0][first['loss_mask'][0] == 1],
                                NEWS_WORD_IDS['4'] + [EOS])
  assert len(examples_of(first)) == 2


def parsed(*overrides):
  """config.data after a command line's overrides, parsed as the trainer's --config flag is."""
  values, argv = flags.FlagValues(), ['main', *overrides]
  locked = data_config()
  locked.lock()  # as an experiment config is: no key can be added
  config_flags.DEFINE_config_dict('config', locked, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_every_key_of_a_declaration_is_set_from_the_command_line(tmp_path):
  config = parsed('--config.source.name=news', '--config.source.format=tsv',
                  "--config.source.columns=('label', 'title', 'description')",
                  '--config.source.files.train=news/train.tsv',
                  '--config.source.files.test=news/test.tsv',
                  # real newlines, as bash's $'...' passes them
                  '--config.source.prompt=Headline: {title}\n{description}\nTopic:',
                  '--config.source.response={label}',
                  f'--config.source.labels={{"label": {json.dumps(NEWS_LABELS)}}}')
  assert source_spec(config.source) == source_spec(news_config(tmp_path).source)
  config = parsed('--config.source.held_out.split=dev', '--config.source.held_out.fraction=0.25',
                  '--config.source.messages=turns', '--config.source.files.dev=dev.jsonl')
  assert (config.source.held_out.split, config.source.held_out.fraction) == ('dev', 0.25)
  assert (config.source.messages, config.source.files.dev) == ('turns', 'dev.jsonl')


def write_alpaca(directory):
  # one object spread over two lines: its row is numbered by the line where it starts
  text = ('[\n  ' + json.dumps(ALPACA_ROWS[0]) + ',\n  ' +
          json.dumps(ALPACA_ROWS[1]).replace('"output"', '\n   "output"') + '\n]\n')
  (directory / 'alpaca.json').write_text(text)


def alpaca_config(directory):
  config = data_config()
  source = config.source
  source.name, source.format, source.files.test = 'alpaca', 'json', str(directory / 'alpaca.json')
  source.prompt, source.response = ALPACA_PROMPT, '{{ output }}'
  config.eval_split = 'test'
  return config


def test_the_alpaca_layout_writes_its_input_section_only_for_a_non_empty_input(tmp_path):
  write_alpaca(tmp_path)
  spec = source_spec(alpaca_config(tmp_path).source)
  without_input, with_input = read_rows(spec, None, 'test')  # an absolute file: no data folder
  assert (without_input.line, with_input.line) == (2, 3)
  assert (without_input.prompt, with_input.prompt) == ALPACA_PROMPTS
  assert (without_input.response, with_input.response) == ('Glad.', '5.')


def test_the_alpaca_prompt_is_masked(smollm2_tokenizer, tmp_path):
  write_alpaca(tmp_path)
  batches, _ = make_eval_batches(alpaca_config(tmp_path), smollm2_tokenizer, batch_size=1,
                                 seq_len=96, cache_dir=str(tmp_path / 'cache'))
  for index, (prompt, response) in enumerate(zip(ALPACA_PROMPTS, ALPACA_RESPONSE_IDS)):
    row = {key: value[0] for key, value in batches[index].items()}
    prompt_ids = smollm2_tokenizer.backend_tokenizer.encode(prompt).ids
    ids = prompt_ids + response + [EOS]
    length = len(ids) - 1
    np.testing.assert_array_equal(row['tokens'][:length], ids[:-1])
    np.testing.assert_array_equal(row['targets'][:length], ids[1:])
    np.testing.assert_array_equal(row['loss_mask'],
                                  [0] * (len(prompt_ids) - 1) + [1] * (len(response) + 1) +
                                  [0] * (96 - length))


def test_a_held_out_split_is_the_end_of_the_train_file(tmp_path):
  (tmp_path / 'qa.jsonl').write_text(''.join(
      json.dumps({'q': f'{n} + 1?', 'a': str(n + 1)}) + '\n' for n in range(10)))
  config = data_config()
  source = config.source
  source.name, source.format, source.files.train = 'qa', 'jsonl', 'qa.jsonl'
  source.prompt, source.response = 'Q: {q}\nA:', ' {a}'
  source.held_out.split, source.held_out.fraction = 'dev', 0.2
  spec = source_spec(source)
  train = list(read_rows(spec, str(tmp_path), 'train'))
  dev = list(read_rows(spec, str(tmp_path), 'dev'))
  assert [row.line for row in train] == list(range(1, 9))
  assert [(row.line, row.response) for row in dev] == [(9, ' 9'), (10, ' 10')]


def test_a_built_in_fills_what_a_declaration_leaves_unset():
  config = data_config()
  config.source.prompt = 'Text: {sentence}\nSentiment:'
  spec, built_in = source_spec(config.source), source_spec('sst2')
  assert spec.prompt == 'Text: {sentence}\nSentiment:'
  assert (spec.splits, spec.labels, spec.format) == (built_in.splits, built_in.labels, 'tsv')
  config.source.files.test = '/elsewhere/test.tsv'
  spec = source_spec(config.source)
  assert spec.path('/data', 'test') == '/elsewhere/test.tsv'
  assert spec.path('/data', 'train') == '/data/sst2/train.tsv'
  config.source.files.test = 'gs://bucket/sst2/test.tsv'  # a URL is never joined to the folder
  assert source_spec(config.source).path('/data', 'test') == 'gs://bucket/sst2/test.tsv'


def test_a_changed_label_word_is_prepared_again(smollm2_tokenizer, tmp_path):
  write_news(tmp_path)
  cache = str(tmp_path / 'cache')
  config = news_config(tmp_path)
  first, _ = make_eval_batches(config, smollm2_tokenizer, batch_size=2, seq_len=32,
                               cache_dir=cache)
  config.source.labels = {'label': {**NEWS_LABELS, '4': ' science'}}
  second, _ = make_eval_batches(config, smollm2_tokenizer, batch_size=2, seq_len=32,
                                cache_dir=cache)
  assert not np.array_equal(first[0]['targets'], second[0]['targets'])
  assert len(list((tmp_path / 'cache').glob('news-*'))) == 2
