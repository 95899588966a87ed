"""experiments/report.py on a sweep root written here: two settings of two seeds and a failed
point. The table's numbers against ones computed here, the paired bootstrap against a slow loop
and the normal approximation, refused pairs, and the command through a subprocess."""

import builtins
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from unittest import mock

from etils.epath import testing as epath_testing
import numpy as np
import pytest

from cli_helpers import ROOT, USER_ENV
from experiments import bootstrap

# Loaded from its file: experiments/ is not a package on the tests' path (its flags are defined
# only when it runs as a command).
_SPEC = importlib.util.spec_from_file_location(
    'report', os.path.join(ROOT, 'experiments', 'report.py'))
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)

ROWS = 300
PFEIFFER = 'pfeiffer_dim=16'  # the settings' names: the point names without their seed part
LORA = 'lora_rank=4_lr=0.003'
GSM8K = 'gsm8k_ia3_seed=0'  # a point of a second base config, one seed
PEAK_BYTES = (700 * 2**20, 705 * 2**20)


# How hard each test row is, shared by every run: the runs' hits correlate over rows as real
# ones do, so that a paired interval is much narrower than an unpaired one.
DIFFICULTY = np.random.default_rng(99).random(ROWS)


def hits_of(seed: int, rows: int = ROWS) -> list[int]:
  noise = np.random.default_rng(seed).random(rows)
  return ((0.7 * DIFFICULTY[:rows] + 0.3 * noise) < 0.6).astype(int).tolist()


def write_sweep(root, lora_rows=ROWS, lora_split='test', recorded_root=None, gsm8k=False):
  """A sweep root as experiments/sweep.py and the trainer leave it (its workdirs recorded under
  `recorded_root`, default `root`; with `gsm8k`, one seed of a second task besides); returns the
  hits written."""
  points, written = [], {}
  settings = [(PFEIFFER, 'pfeiffer,runlocal', {'peft.bottleneck.dim': 16}, 1, 120_000),
              (LORA, 'lora', {'peft.lora.rank': 4, 'peft.lora.alpha': 8,
                              'peft.lora.optimizer.learning_rate': 3e-3}, 2, 450_000)]
  for name, arg, overrides, offset, params in settings:
    for seed in (0, 1):
      point = f'{name}_seed={seed}'
      workdir = root / point
      workdir.mkdir()
      rows = lora_rows if name == LORA else ROWS
      hits = written[point] = hits_of(10 * seed + offset, rows)
      summary = {'trainable_params': params, 'trainable_percent': 100 * params / 134_515_008,
                 'accuracy_before': 0.5, 'accuracy_after': sum(hits) / rows,
                 'tokens_per_s': 1000.0 + 100 * seed, 'step_memory_bytes': 600 * 2**20,
                 'adapter_bytes': 4 * params + 2048, 'eval_loss': 0.4, 'test_step': 40}
      if name == PFEIFFER:
        summary['device_peak_bytes'] = PEAK_BYTES[seed]
      (workdir / 'summary.json').write_text(json.dumps(summary))
      (workdir / 'test_hits.json').write_text(json.dumps({
          'metric': 'accuracy', 'split': lora_split if name == LORA else 'test', 'limit': 0,
          'step': 40, 'hits': hits}))
      points.append({'name': point, 'arg': arg, 'overrides': {**overrides, 'seed': seed},
                     'workdir': f'{recorded_root or root}/{point}', 'status': 'done'})
  points.append({'name': f'{PFEIFFER}_seed=2', 'arg': 'pfeiffer,runlocal',
                 'overrides': {'peft.bottleneck.dim': 16, 'seed': 2},
                 'workdir': str(root / f'{PFEIFFER}_seed=2'), 'status': 'failed'})
  if gsm8k:
    (root / GSM8K).mkdir()
    (root / GSM8K / 'summary.json').write_text(json.dumps({
        'trainable_params': 30_000, 'trainable_percent': 0.02, 'exact_match_before': 0.1,
        'exact_match_after': 0.125, 'tokens_per_s': 500.0, 'step_memory_bytes': 2**30}))
    (root / GSM8K / 'test_hits.json').write_text(json.dumps({
        'metric': 'exact_match', 'split': 'test', 'limit': 0, 'step': 40, 'hits': [1, 0] * 4}))
    points.append({'name': GSM8K, 'arg': 'ia3', 'base': 'configs/gsm8k.py',
                   'overrides': {'seed': 0}, 'workdir': str(root / GSM8K), 'status': 'done'})
  (root / 'sweep.json').write_text(json.dumps({
      'sweep': 'configs/sweeps/test.py', 'arg': None, 'base': 'configs/sst2.py',
      'points': points}))
  return written


def accuracy(hits):
  return sum(hits) / len(hits)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  hits = write_sweep(root)
  result, text = report.report(str(root), str(root / 'out' / 'small'), [(PFEIFFER, LORA)])
  return root, hits, result, text


def test_table_rows_are_the_seeds_statistics(written):
  root, hits, result, text = written
  lines = {line.split(' | ')[0].lstrip('| '): line for line in text.splitlines()
           if line.startswith('| ')}
  for label, name in (('Pfeiffer adapter dim 16', PFEIFFER), ('LoRA r 4 (all 7)', LORA)):
    values = [accuracy(hits[f'{name}_seed={seed}']) for seed in (0, 1)]
    assert values[0] != values[1]
    cell = f'{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n=2)'
    assert cell in lines[label], (cell, lines[label])
  assert '| LoRA r 4 (all 7) | lr 3e-3 | 450,000 |' in lines['LoRA r 4 (all 7)']
  # the allocator's peak where a setting's seeds reported one (marked apart from compiled memory)
  assert f'| {max(PEAK_BYTES) / 2**20:,.1f} |' in lines['Pfeiffer adapter dim 16']
  assert '| 600.0 c |' in lines['LoRA r 4 (all 7)']
  assert '| 1,050 |' in lines['LoRA r 4 (all 7)']  # the median tokens/s of 1,000 and 1,100
  labels = [r['label'] for r in result['tasks'][0]['rows']]
  assert labels == ['Pfeiffer adapter dim 16', 'LoRA r 4 (all 7)']
  assert 'Zero-shot base: 0.5000 test accuracy' in text
  assert json.loads((root / 'out' / 'small.json').read_text())['tasks'][0]['rows'][0]['n'] == 2


def test_unfinished_point_is_listed_not_aggregated(written):
  _, _, result, text = written
  assert f'Not finished: {PFEIFFER}_seed=2 (failed)' in text
  assert result['not_finished'] == [{'name': f'{PFEIFFER}_seed=2', 'status': 'failed'}]
  assert result['tasks'][0]['rows'][0]['seeds'] == [0, 1]


def test_plot_is_png(written):
  root = written[0]
  assert (root / 'out' / 'small.png').read_bytes().startswith(b'\x89PNG\r\n\x1a\n')
  assert (root / 'out' / 'small.md').read_text() == written[3]


def slow_bootstrap(per_row, resamples, seed):
  """One resample at a time, the textbook loop."""
  rng = np.random.default_rng(seed)
  means = np.array([per_row[rng.integers(0, len(per_row), len(per_row))].mean()
                    for _ in range(resamples)])
  return np.percentile(means, [2.5, 97.5]), np.mean(means <= 0)


def test_bootstrap_against_slow_loop_and_normal_approximation(written):
  _, hits, result, text = written
  pair = result['pairs'][0]
  a = np.array([hits[f'{PFEIFFER}_seed={s}'] for s in (0, 1)], dtype=float)
  b = np.array([hits[f'{LORA}_seed={s}'] for s in (0, 1)], dtype=float)
  difference = a.mean() - b.mean()  # the plain accuracy difference, over both seeds
  assert difference > 0.01
  assert pair['difference'] == pytest.approx(difference, abs=1e-12)
  assert pair['low'] < difference < pair['high']
  per_row = a.mean(axis=0) - b.mean(axis=0)
  (low, high), at_most_zero = slow_bootstrap(per_row, bootstrap.RESAMPLES,
                                             bootstrap.BOOTSTRAP_SEED)
  # a few Monte Carlo errors apart at most (the same draws, where numpy's stream agrees)
  assert pair['low'] == pytest.approx(low, abs=0.005)
  assert pair['high'] == pytest.approx(high, abs=0.005)
  assert 0.02 < at_most_zero < 0.5  # a fraction that a wrong comparison would move
  assert pair['at_most_zero'] == pytest.approx(at_most_zero, abs=0.01)
  # the normal approximation of the paired difference; an unpaired interval is twice as wide
  half_width = 1.96 * per_row.std(ddof=1) / math.sqrt(ROWS)
  assert 0.85 < (pair['high'] - pair['low']) / (2 * half_width) < 1.15
  assert f'| {PFEIFFER} | {LORA} | accuracy | {difference:+.4f} |' in text


def test_bootstrap_chunks_do_not_change_the_statistic(monkeypatch):
  per_side = np.random.default_rng(3).random((2, 50)) < 0.6
  whole = bootstrap.paired_bootstrap(per_side[:1], per_side[1:], resamples=500)
  monkeypatch.setattr(bootstrap, "INDEX_ELEMENTS", 50 * 7)  # 7 resamples a draw
  chunked = bootstrap.paired_bootstrap(per_side[:1], per_side[1:], resamples=500)
  assert chunked['difference'] == whole['difference']
  assert abs(chunked['high'] - whole['high']) < 0.05 and abs(chunked['low'] - whole['low']) < 0.05


@pytest.mark.parametrize('change', [{'lora_rows': ROWS - 1}, {'lora_split': 'dev'}])
def test_mismatched_hits_are_refused_naming_both(tmp_path, change):
  write_sweep(tmp_path, **change)
  with pytest.raises(ValueError, match=f'cannot pair {PFEIFFER} with {LORA}'):
    report.report(str(tmp_path), str(tmp_path / 'r'), [(PFEIFFER, LORA)])
  assert not (tmp_path / 'r.md').exists()  # nothing written for a refused pair
  with pytest.raises(ValueError, match='names 0 finished settings'):
    report.report(str(tmp_path), str(tmp_path / 'r'), [(PFEIFFER, 'houlsby')])


def test_each_base_config_has_its_own_table_and_metric(tmp_path):
  write_sweep(tmp_path, gsm8k=True)
  result, text = report.report(str(tmp_path), str(tmp_path / 'r'))
  assert [(t['base'], t['metric']) for t in result['tasks']] == [
      ('configs/sst2.py', 'accuracy'), ('configs/gsm8k.py', 'exact_match')]
  gsm8k = text[text.index('## configs/gsm8k.py: test exact_match'):]
  assert 'Zero-shot base: 0.1000 test exact_match' in gsm8k
  assert '| (IA)³ |  | 30,000 | 0.02% | 0.1250 (n=1) |' in gsm8k  # one seed: no ± std
  with pytest.raises(ValueError, match=f'cannot pair {PFEIFFER} with gsm8k_ia3: .*metric'):
    report.report(str(tmp_path), str(tmp_path / 'r'), [(PFEIFFER, 'gsm8k_ia3')])


def test_runs_of_several_configs_tested_on_one_task_share_its_table(tmp_path):
  """A table per task tested (the hits' source and split), whatever config each run was of:
  a run trained on SST-2, one fused for it and one scored on it after training on TREC share
  SST-2's table, labelled by their configs; TREC's runs make another."""
  points = []
  for name, base, arg, overrides, source, seed in (
      ('sst2', 'configs/sst2.py', 'pfeiffer', {}, 'sst2', 1),
      ('fusion_sst2', 'configs/fusion.py', 'sst2',
       {'peft.fusion.adapters': ['{root}/sst2/adapter', '{root}/trec']}, 'sst2', 2),
      ('trec_on_sst2', 'configs/average.py', 'sst2', {'start_from': ['{root}/trec']}, 'sst2', 3),
      ('trec', 'configs/trec.py', 'pfeiffer', {}, 'trec', 4)):
    (tmp_path / name).mkdir()
    hits = hits_of(seed)
    (tmp_path / name / 'summary.json').write_text(json.dumps({
        'trainable_params': 1000, 'trainable_percent': 0.1, 'accuracy_after': accuracy(hits)}))
    (tmp_path / name / 'test_hits.json').write_text(json.dumps({
        'metric': 'accuracy', 'source': source, 'split': 'test', 'limit': 0, 'step': 60,
        'hits': hits}))
    points.append({'name': name, 'arg': arg, 'base': base, 'overrides': overrides,
                   'status': 'done'})
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 'combining', 'arg': None,
                                                   'base': 'configs/sst2.py', 'points': points}))
  result, text = report.report(str(tmp_path), str(tmp_path / 'r'), [('fusion_sst2', 'sst2')])
  tables = {t['base']: [(r['label'], r['settings'], r['names']) for r in t['rows']]
            for t in result['tasks']}
  assert tables == {
      'sst2 test': [('sst2: Pfeiffer adapter dim 64', '', ['sst2']),
                    ('fusion', 'sst2 + trec', ['fusion_sst2']),
                    ('average', 'trec alone', ['trec_on_sst2'])],
      'trec test': [('Pfeiffer adapter dim 64', '', ['trec'])]}
  assert '## sst2 test: test accuracy' in text and result['pairs'][0]['rows'] == ROWS
  with pytest.raises(ValueError, match='cannot pair trec with sst2: .*source'):
    report.report(str(tmp_path), str(tmp_path / 'r'), [('trec', 'sst2')])


def test_command(tmp_path):
  # workdirs recorded where the sweep ran, since moved: each is found under ROOT by its name
  write_sweep(tmp_path, recorded_root='/moved/elsewhere')
  done = subprocess.run(
      # a pair by the start of each name, up to a `_`
      [sys.executable, '-m', 'experiments.report', str(tmp_path), '--pair=pfeiffer,lora_rank=4'],
      cwd=ROOT, env=USER_ENV, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert '| Pfeiffer adapter dim 16 |' in done.stdout and '## A − B' in done.stdout
  assert done.stdout == (tmp_path / 'report.md').read_text()
  assert (tmp_path / 'report.png').read_bytes().startswith(b'\x89PNG')
  assert f'| {PFEIFFER} | {LORA} | accuracy | ' in done.stdout  # the names in full
  assert json.loads((tmp_path / 'report.json').read_text())['pairs'][0]['a'] == PFEIFFER


def test_a_bucket_root_is_read_and_written_through_epath(tmp_path):
  """gs://bucket redirected to tmp_path/bucket by epath's mock; a bare open of it fails."""
  def local(path):
    return str(tmp_path / os.fspath(path).removeprefix('gs://'))

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def guarded_open(path, *args, **kwargs):
    bucket = isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith('gs:')
    assert not bucket, f'{path} opened outside etils.epath'
    return unguarded_open(path, *args, **kwargs)

  unguarded_open = builtins.open
  (tmp_path / 'bucket').mkdir()
  write_sweep(tmp_path / 'bucket', recorded_root='gs://bucket')
  with epath_testing.mock_epath(**{name: redirect for name in (
      'exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'stat')}), \
      mock.patch.object(builtins, 'open', guarded_open):
    _, text = report.report('gs://bucket', None, [(PFEIFFER, LORA)])
  assert (tmp_path / 'bucket' / 'report.md').read_text() == text
  assert (tmp_path / 'bucket' / 'report.png').read_bytes().startswith(b'\x89PNG')
  assert 'Not finished' in text and '| Pfeiffer adapter dim 16 |' in text


def test_runs_without_a_test_are_reported_by_their_eval_metric(tmp_path):
  """A learning-rate search reads no test split: its table is the runs' final eval metric,
  and the overrides every run shares are shown once, not in each row."""
  points = []
  for rate, accuracy_on_dev in ((3e-4, 0.898), (1e-3, 0.916)):
    name = f'houlsby_dim=64_lr={rate}'
    (tmp_path / name).mkdir()
    (tmp_path / name / 'summary.json').write_text(json.dumps({
        'trainable_params': 4_000_000, 'trainable_percent': 3.0, 'eval_loss': 0.2,
        'eval_perplexity': 1.2, 'eval_accuracy': accuracy_on_dev, 'tokens_per_s': 400.0}))
    points.append({'name': name, 'arg': 'houlsby', 'status': 'pending',  # a stale status
                   'overrides': {'peft.bottleneck.dim': 64, 'test_metric': '', 'seed': 0,
                                 'peft.bottleneck.optimizer.learning_rate': rate}})
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 's.py', 'base': 'configs/sst2.py',
                                                   'points': points}))
  _, text = report.report(str(tmp_path), str(tmp_path / 'out'))
  assert '| eval accuracy (mean ± std, n) |' in text
  assert 'Every run: `peft.bottleneck.dim=64`, `test_metric=`' in text
  assert '| Houlsby adapter dim 64 | lr 3e-4 | 4,000,000 | 3% | 0.8980 (n=1) |' in text
  assert '| Houlsby adapter dim 64 | lr 1e-3 | 4,000,000 | 3% | 0.9160 (n=1) |' in text
  assert 'Not finished' not in text


def test_seeds_that_differ_in_test_before_are_one_setting(tmp_path):
  """...and a seed resumed after its last step (no step trained, so no speed or memory measured)
  leaves those columns to the seed that measured them."""
  points = []
  for seed, after in ((0, 0.9), (1, 0.8)):
    name = f'ia3_lr=0.03_seed={seed}_test_before={seed == 0}'
    (tmp_path / name).mkdir()
    summary = {'trainable_params': 57_600, 'trainable_percent': 0.04, 'accuracy_after': after,
               **({'accuracy_before': 0.7856, 'tokens_per_s': 400.0,
                   'step_memory_bytes': 2**30} if seed == 0 else {})}
    (tmp_path / name / 'summary.json').write_text(json.dumps(summary))
    points.append({'name': name, 'arg': 'ia3', 'overrides': {
        'peft.ia3.optimizer.learning_rate': 0.03, 'seed': seed, 'test_before': seed == 0}})
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 's.py', 'base': 'configs/sst2.py',
                                                   'points': points}))
  _, text = report.report(str(tmp_path), str(tmp_path / 'out'))
  assert '| (IA)³ |  | 57,600 | 0.04% | 0.8500 ± 0.0707 (n=2) | 400 | 1,024.0 |' in text, text
  assert '| ia3_lr=0.03 |' in text and 'Zero-shot base: 0.7856' in text
