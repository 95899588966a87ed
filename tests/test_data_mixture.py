"""A weighted mixture of declared sources (`config.data.mixture`): the realized shares follow
the weights, each example keeps its own source's template and label words, bad entries are
named by their key, the mixed stream resumes exactly (across process counts too) and is set
by the seed. The sources are small JSONL files of three made-up tasks."""

import collections
import json
import math
import re

import pytest

from additive_jax.data.config import data_config, mixture_entry, source_config
from additive_jax.data.mixture import mixture_entries
from additive_jax.data.pipeline import make_train_iterator
from additive_jax.train.config_checks import check_config
from cli_helpers import experiment_config
from conftest import SHARED_DATA
from data_helpers import examples_of

# name: (rows, prompt, the labelled field, {value: label word}, the value of row i)
TASKS = {
    'alpha': (120, 'Alpha: {text}\nLabel:', 'label', {'0': ' no', '1': ' yes'},
              lambda i: str(i % 2)),
    'beta': (90, 'Beta: {text}\nKind:', 'kind', {'r': ' red', 'b': ' blue', 'g': ' green'},
             lambda i: 'rbg'[i % 3]),
    'gamma': (60, 'Gamma: {text}\nSize:', 'size', {'s': ' small', 'l': ' large'},
              lambda i: 'sl'[i % 2]),
}
EXAMPLE = re.compile(r'(Alpha|Beta|Gamma): row (\d+)( x+)?\n[A-Z][a-z]+:( \w+)')
SEQ_LEN = 64


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """(data folder, cache folder): each task's train.jsonl; every 10th alpha row is too long for
  SEQ_LEN, so that the over-long policy 'drop' leaves it out of the mixture."""
  data = tmp_path_factory.mktemp('mixture_data')
  for name, (rows, _, field, _, value) in TASKS.items():
    (data / name).mkdir()
    lines = [{'text': f'row {i}' + (' x' * 80 if name == 'alpha' and i % 10 == 9 else ''),
              field: value(i)} for i in range(rows)]
    (data / name / 'train.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in lines))
  return str(data), str(tmp_path_factory.mktemp('mixture_cache'))


def entry(name, weight):
  e = mixture_entry(name, weight)
  _, prompt, field, words, _ = TASKS[name]
  e.format, e.files.train = 'jsonl', f'{name}/train.jsonl'
  e.prompt, e.response = prompt, f'{{{field}}}'
  e.labels = {field: words}
  return e


def mixed_config(folders, weights, **overrides):
  """The mixture of `weights` ({task: weight}); long alpha rows dropped, so that every example
  decodes whole."""
  config = data_config()
  config.data_dir, config.over_long = folders[0], 'drop'
  for name, weight in weights.items():
    config.mixture[name] = entry(name, weight)
  config.update(overrides)
  return config


def iterator(tokenizer, folders, config, seed=0, batch_size=8, **shard):
  return make_train_iterator(config, tokenizer, batch_size=batch_size, seq_len=SEQ_LEN,
                             seed=seed, cache_dir=folders[1], **shard)[0]


def decoded(tokenizer, batch):
  """(task, row, label word) of each example of a batch, in stream order (the packer fills
  rows first-fit in stream order, and emits a batch's rows together)."""
  found = []
  for ids in examples_of(batch):
    match = EXAMPLE.fullmatch(tokenizer.decode(ids, skip_special_tokens=True))
    assert match, tokenizer.decode(ids)
    found.append((match[1].lower(), int(match[2]), match[4]))
  return found


def batches_equal(a, b):
  return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_realized_shares_follow_the_weights(smollm2_tokenizer, folders):
  # grain mixes deterministically: after k examples an entry's count is within the number of
  # entries of k × its share (weights 2:3:5 are whole numbers for grain, no rounding)
  weights = {'alpha': 2, 'beta': 3, 'gamma': 5}
  shares = {name: w / sum(weights.values()) for name, w in weights.items()}
  config = mixed_config(folders, weights)
  mixed = iterator(smollm2_tokenizer, folders, config)
  seen = collections.Counter()
  for _ in range(40):
    seen.update(task for task, _, _ in decoded(smollm2_tokenizer, next(mixed)))
    k = sum(seen.values())
    assert seen == mixed.examples  # the iterator's own count (its state, the run's log)
    assert all(abs(seen[name] - k * share) <= len(weights) for name, share in shares.items()), (
        seen, k)
  assert k > 1000  # several epochs of each task; 1 alpha row in 10 dropped, never counted
  # relative weights: the same shares, the same stream
  normalized = mixed_config(folders, shares)
  again = iterator(smollm2_tokenizer, folders, normalized)
  fresh = iterator(smollm2_tokenizer, folders, config)
  assert all(batches_equal(next(again), next(fresh)) for _ in range(3))


def test_each_example_keeps_its_own_template_and_label_words(smollm2_tokenizer, folders):
  config = mixed_config(folders, {'alpha': 1, 'beta': 1})
  mixed = iterator(smollm2_tokenizer, folders, config)
  tasks = set()
  for _ in range(5):
    batch = next(mixed)
    for task, row, word in decoded(smollm2_tokenizer, batch):
      _, _, _, words, value = TASKS[task]
      assert word == words[value(row)], (task, row, word)
      tasks.add(task)
    # the loss is on each label word and its EOS alone
    learned = batch['targets'][batch['loss_mask'] == 1]
    words = {w for task in ('alpha', 'beta') for w in TASKS[task][3].values()}
    assert set(smollm2_tokenizer.decode([t]) for t in learned) <= words | {'<|im_end|>'}
  assert tasks == {'alpha', 'beta'}
  # examples of both tasks share packed rows, apart by their segments
  assert any(len({task for task, _, _ in decoded(smollm2_tokenizer, {
      k: v[i:i + 1] for k, v in batch.items()})}) == 2 for i in range(8))


@pytest.mark.parametrize('packing, steps', [(True, 12), (False, 40)])
def test_a_restored_state_gives_the_batches_of_an_uninterrupted_run(smollm2_tokenizer, folders,
                                                                    packing, steps):
  config = mixed_config(folders, {'alpha': 0.3, 'beta': 0.7}, packing=packing)
  uninterrupted = iterator(smollm2_tokenizer, folders, config, seed=5)
  for _ in range(steps):  # past an epoch of each task
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # as a checkpoint keeps it
  counted = dict(uninterrupted.examples)
  expected = [next(uninterrupted) for _ in range(5)]
  resumed = iterator(smollm2_tokenizer, folders, config, seed=5)
  assert not batches_equal(next(resumed), expected[0])
  resumed.set_state(state)
  assert resumed.examples == counted
  assert all(batches_equal(next(resumed), batch) for batch in expected)
  assert resumed.examples == uninterrupted.examples


def test_processes_take_their_rows_and_share_one_state(smollm2_tokenizer, folders):
  config = mixed_config(folders, {'alpha': 1, 'beta': 1, 'gamma': 2})
  alone = iterator(smollm2_tokenizer, folders, config)
  for _ in range(7):
    next(alone)
  state = alone.get_state()
  expected = [next(alone) for _ in range(3)]
  shards = [iterator(smollm2_tokenizer, folders, config, process_index=p, process_count=2)
            for p in range(2)]
  for shard in shards:  # a run saved by one process resumes with two
    shard.set_state(state)
  for batch in expected:
    mine, theirs = (next(shard) for shard in shards)
    assert all((batch[k][:4] == mine[k]).all() and (batch[k][4:] == theirs[k]).all()
               for k in batch)
  # ... and one saved by two resumes with one: the state is the same on every process
  assert shards[0].get_state() == shards[1].get_state() == alone.get_state()
  again = iterator(smollm2_tokenizer, folders, config)
  again.set_state(shards[1].get_state())
  assert batches_equal(next(again), next(alone))


def test_the_seed_sets_the_stream_and_each_entry_has_its_own_order(smollm2_tokenizer, folders):
  first = lambda config, seed=3: next(iterator(smollm2_tokenizer, folders, config, seed=seed))
  config = mixed_config(folders, {'alpha': 1, 'beta': 1})
  assert batches_equal(first(config), first(config))
  assert not batches_equal(first(config), first(config, seed=4))
  alpha_rows = lambda config: [row for task, row, _ in decoded(smollm2_tokenizer, first(config))
                               if task == 'alpha']
  # an entry's order depends on the seed and its key, not on the other entries ...
  assert alpha_rows(config)[:10] == alpha_rows(mixed_config(folders, {'alpha': 1, 'gamma': 1}))[:10]
  # ... so two entries of one file are shuffled apart: 20 rows, 10 from each, are not 10 pairs
  twice = mixed_config(folders, {'alpha': 1})
  twice.mixture.copy = entry('alpha', 1)
  assert len(set(alpha_rows(twice)[:20])) > 14


def test_finite_epochs_end_with_the_first_entry_to_run_out(smollm2_tokenizer, folders):
  config = mixed_config(folders, {'alpha': 1, 'gamma': 1}, num_epochs=1, packing=False)
  mixed = iterator(smollm2_tokenizer, folders, config, batch_size=4)
  seen = collections.Counter(task for batch in mixed for task, _, _ in
                             decoded(smollm2_tokenizer, batch))
  # gamma's 60 rows run out first; alpha has given as many (and at most one more)
  assert seen['gamma'] <= 60 and seen['alpha'] - seen['gamma'] in (0, 1)
  assert seen['gamma'] >= 60 - 4


@pytest.mark.parametrize('change, message', [
    (lambda m: setattr(m.beta, 'weight', 0.0),
     'config.data.mixture.beta.weight must be positive (.*), got 0.0'),
    (lambda m: setattr(m.beta, 'weight', -1.0), r'config.data.mixture.beta.weight .* got -1.0'),
    (lambda m: setattr(m.beta, 'weight', math.nan), r'config.data.mixture.beta.weight .* got nan'),
    (lambda m: setattr(m.beta, 'weight', math.inf), r'config.data.mixture.beta.weight .* got inf'),
    (lambda m: setattr(m, 'beta', source_config('trec')),
     'config.data.mixture.beta.weight must be positive .* got None'),
    (lambda m: setattr(m, 'delta', 0.5),
     r"config.data.mixture.delta must be a source declaration with a weight, e.g. "
     r"mixture_entry\('trec', weight=0.5\), got 0.5"),
    (lambda m: setattr(m.beta, 'format', 'xml'), "config.data.mixture.beta.format is 'xml'"),
    (lambda m: setattr(m, 'imdb', mixture_entry('imdb')),
     r"config.data.mixture.imdb.format is not set: .* \('imdb' is not a built-in source"),
    (lambda m: m.beta.held_out.update(split='dev', fraction=1.5),
     r'config.data.mixture.beta.held_out.fraction=1.5 must be in \(0, 1\)'),
    (lambda m: setattr(m.beta, 'prompt', 'Beta: {text'),
     'config.data.mixture.beta.prompt'),
    (lambda m: m.beta.files.update(train=None, test='beta/train.jsonl'),
     r"config.data.mixture.beta \(config.data.split='train'\): beta has no split 'train' "
     r"\(splits: test\)"),
    (lambda m: setattr(m, 'chat', mixture_entry('chat')) or m.chat.update(
        format='jsonl', files={'train': 'beta/train.jsonl'}, messages='turns'),
     r"config.data.template='plain': the rows of chat are conversations "
     r"\(config.data.mixture.chat.messages='turns'\)"),
], ids=['weight_zero', 'weight_negative', 'weight_nan', 'weight_inf', 'no_weight',
        'not_a_declaration', 'format', 'unknown_built_in', 'held_out', 'template', 'split',
        'conversation'])
def test_a_bad_entry_is_named_by_its_key(folders, change, message):
  config = mixed_config(folders, {'alpha': 1, 'beta': 1})
  change(config.mixture)
  with pytest.raises(ValueError, match=message):
    mixture_entries(config)


def test_the_mixed_config_names_its_primary_and_takes_weights_from_the_command_line():
  config = experiment_config('mixed', 'pfeiffer,trec')
  assert config.data.source.name == 'trec' and sorted(config.data.mixture) == ['sst2', 'trec']
  assert experiment_config('mixed', 'runlocal').data.source.name == 'sst2'
  with pytest.raises(ValueError, match='configs/mixed.py: name one task of sst2, trec, got sst2, trec'):
    experiment_config('mixed', 'sst2,trec')
  config.data.mixture.trec.weight = 1.5  # what --config.data.mixture.trec.weight=1.5 sets
  assert [e.share for e in mixture_entries(config.data)] == [0.25, 0.75]
  with pytest.raises(AttributeError):
    config.data.mixture.news = mixture_entry('news')  # a locked config gains no entry
  config.data.data_dir = SHARED_DATA
  config.data.mixture.trec.weight = 0.0
  with pytest.raises(ValueError, match='config.data.mixture.trec.weight must be positive'):
    check_config(config)
  config.data.mixture.trec.weight = 0.5
  config.data.mixture.trec.files.train = 'trec/missing.tsv'
  with pytest.raises(FileNotFoundError, match="config.data.split='train' of "
                                              'config.data.mixture.trec: no data file '
                                              '.*trec/missing.tsv'):
    check_config(config)
