"""experiments/sweep.py on sweep files: the points of hyper's algebra, each a real run in its own
workdir; a rerun skips finished points; a failing point is recorded and the sweep goes on;
`--dry-run` and `--shard` print and split the right points; the report reads the root."""

import json
import os
import subprocess
import sys

import pytest

from additive_jax.train.config_checks import check_config
from additive_jax.train.start_from import check_start_keys
from experiments import hyper
from experiments.sweep import command, load_sweep, point_names
from cli_helpers import ROOT, USER_ENV, experiment_config
from conftest import xla_flags

SWEEP_FILE = '''
BASE = 'configs/sst2.py'


def get_hyper(h):
  return h.product([
      h.chain([h.fixed('arg', 'ia3,runlocal'),
               h.zip([h.fixed('arg', 'lora,runlocal'), h.fixed('config.peft.lora.rank', 2)])]),
      h.fixed('config.model', {model!r}), h.fixed('config.data.data_dir', {data!r}),
      h.fixed('config.num_steps', 2), h.fixed('config.test_limit', 8),
      h.sweep('config.seed', [0, 1])])
'''
FAILING_FILE = '''
BASE = 'configs/sst2.py'


def get_hyper(h):
  return h.product([h.fixed('arg', 'lora,runlocal'), h.sweep('config.peft.lora.rank', [-1, -2])])
'''
NAMES = ['ia3+runlocal_seed=0', 'ia3+runlocal_seed=1', 'lora+runlocal_rank=2_seed=0',
         'lora+runlocal_rank=2_seed=1']


def sweep(*args, timeout=900):
  env = {**USER_ENV, 'XLA_FLAGS': xla_flags(1)}
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def swept(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """(sweep file, root, the first sweep, its rerun): two settings × two seeds, run twice."""
  folder = tmp_path_factory.mktemp('sweep')
  sweep_file = folder / 'two_by_two.py'
  sweep_file.write_text(SWEEP_FILE.format(model=tiny_with_tokenizer, data=small_sst2))
  root = folder / 'runs'
  first = sweep(f'--config={sweep_file}', f'--root={root}')
  again = sweep(f'--config={sweep_file}', f'--root={root}')
  return sweep_file, root, first, again


def test_every_point_runs_once_in_its_workdir(swept):
  _, root, first, _ = swept
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert first.stdout.count('$ ') == 4
  index = json.loads((root / 'sweep.json').read_text())
  assert [p['name'] for p in index['points']] == NAMES
  assert {p['status'] for p in index['points']} == {'done'}
  for point in index['points']:
    summary = json.loads((root / point['name'] / 'summary.json').read_text())
    config = json.loads(next((root / point['name']).glob('checkpoints/*/config/*')).read_text())
    assert config['seed'] == point['overrides']['seed'] and config['num_steps'] == 2
    assert len(json.loads((root / point['name'] / 'test_hits.json').read_text())['hits']) == 8
    if 'ia3' in point['name']:  # (IA)³ on 2 layers: L·(2·K·H + F)
      assert summary['trainable_params'] == 2 * (2 * 16 + 80)


def test_a_rerun_skips_every_finished_point(swept):
  _, _, _, again = swept
  assert again.returncode == 0, again.stderr[-3000:]
  assert '$ ' not in again.stdout and again.stdout.count('done') >= 4


def test_the_report_reads_the_root(swept, tmp_path):
  _, root, _, _ = swept
  out = tmp_path / 'report'
  result = subprocess.run([sys.executable, '-m', 'experiments.report', str(root), f'--out={out}'],
                          cwd=ROOT, env=USER_ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  table = out.with_suffix('.md').read_text()
  assert table.count('n=2') == 2, table
  assert out.with_suffix('.png').read_bytes().startswith(b'\x89PNG')


def test_dry_run_and_shards_print_the_right_points(swept):
  sweep_file, root, _, _ = swept
  shards = [sweep(f'--config={sweep_file}', f'--root={root}', '--dry-run', f'--shard={i}/2',
                  timeout=120) for i in range(2)]
  for i, shard in enumerate(shards):
    assert shard.returncode == 0, shard.stderr[-3000:]
    printed = [line.split()[0] for line in shard.stdout.splitlines()[1:] if '[' in line]
    assert printed == NAMES[i::2]
    assert shard.stdout.count('--workdir=') == 2 and 'additive_jax.main' in shard.stdout
  assert '[done]' in shards[0].stdout


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
  sweep_file = tmp_path / 'failing.py'
  sweep_file.write_text(FAILING_FILE)
  result = sweep(f'--config={sweep_file}', f'--root={tmp_path / "runs"}', timeout=300)
  assert result.returncode == 1
  assert '2 failed: lora+runlocal_rank=-1, lora+runlocal_rank=-2' in result.stderr
  for rank in (-1, -2):
    failure = json.loads((tmp_path / 'runs' / f'lora+runlocal_rank={rank}' /
                          'sweep_failure.json').read_text())
    assert failure['returncode'] == 1 and 'rank' in failure['output_tail']


def test_hyper_algebra():
  points = hyper.product([hyper.chain([hyper.fixed('arg', 'ia3'),
                                       hyper.zip([hyper.sweep('arg', ['lora', 'lora']),
                                                  hyper.sweep('config.peft.lora.rank', [4, 16])])]),
                          hyper.sweep('config.seed', [0, 1])])
  assert points == [{'arg': 'ia3', 'config.seed': 0}, {'arg': 'ia3', 'config.seed': 1},
                    {'arg': 'lora', 'config.peft.lora.rank': 4, 'config.seed': 0},
                    {'arg': 'lora', 'config.peft.lora.rank': 4, 'config.seed': 1},
                    {'arg': 'lora', 'config.peft.lora.rank': 16, 'config.seed': 0},
                    {'arg': 'lora', 'config.peft.lora.rank': 16, 'config.seed': 1}]
  assert point_names(points)[2] == 'lora_rank=4_seed=0'
  with pytest.raises(ValueError, match='lengths'):
    hyper.zip([hyper.sweep('config.seed', [0, 1]), hyper.sweep('config.dtype', ['float32'])])
  with pytest.raises(ValueError, match="'config.seed' is set twice"):
    hyper.product([hyper.fixed('config.seed', 0), hyper.fixed('config.seed', 1)])
  with pytest.raises(ValueError, match="a sweep key is 'arg', 'base', 'name' or 'config.<key>'"):
    hyper.sweep('seed', [0])
  with pytest.raises(ValueError, match='points with the same values'):
    point_names([{'arg': 'ia3'}, {'arg': 'ia3'}, {'arg': 'lora'}])


def test_a_named_point_reads_an_earlier_point_under_the_root(tmp_path):
  """`name` names a point's workdir; `{root}` in a value (or in a tuple's texts) is the root."""
  points = hyper.chain([
      hyper.product([hyper.fixed('name', 'first'), hyper.fixed('arg', 'ia3')]),
      hyper.product([hyper.fixed('name', 'second'), hyper.fixed('base', 'configs/average.py'),
                     hyper.fixed('config.start_from', ('{root}/first', '{root}/x/adapter'))])])
  assert point_names(points) == ['first', 'second']
  argv = command('configs/sst2.py', points[1], tmp_path / 'second')
  assert argv[3:] == ['--config=configs/average.py', f'--workdir={tmp_path / "second"}',
                      f"--config.start_from=('{tmp_path}/first', '{tmp_path}/x/adapter')"]


@pytest.mark.parametrize('spec', ['configs/sweeps/presets.py', 'configs/sweeps/small.py',
                                  'configs/sweeps/small.py:search',
                                  'configs/sweeps/full.py:search'])
def test_every_point_of_the_sweep_files_is_a_valid_config(spec):
  """Each point's config argument and overrides, applied as the command line would, pass the
  trainer's checks: a misspelt key or a bad value in a sweep file fails here, not hours in."""
  base, points, _ = load_sweep(os.path.join(ROOT, spec.split(':')[0]) +
                               (':' + spec.split(':')[1] if ':' in spec else ''))
  checked = set()
  for point in points:
    overrides = {k.removeprefix('config.'): v for k, v in point.items() if k.startswith('config.')}
    key = (point.get('base', base), point.get('arg'), repr(sorted(overrides.items())))
    if key in checked:
      continue
    checked.add(key)
    config = experiment_config(os.path.splitext(os.path.basename(key[0]))[0], point.get('arg'))
    config.update_from_flattened_dict(overrides)  # a locked config: an unknown key raises
    check_config(config)


def test_the_combining_sweep_reads_only_earlier_points():
  """configs/sweeps/combining.py: every point's config and overrides load; a trained point
  passes the trainer's checks; a point reading other runs (`{root}/NAME`) reads earlier points
  only, so the sweep runs in order without a missing source."""
  base, points, _ = load_sweep(os.path.join(ROOT, 'configs/sweeps/combining.py'))
  names = point_names(points)
  for index, point in enumerate(points):
    config = experiment_config(os.path.splitext(os.path.basename(point['base']))[0],
                               point.get('arg'))
    overrides = {k.removeprefix('config.'): v for k, v in point.items() if k.startswith('config.')}
    config.update_from_flattened_dict(overrides)  # a locked config: an unknown key raises
    read = [p for v in overrides.values() for p in (v if isinstance(v, tuple) else (v,))
            if isinstance(p, str) and p.startswith('{root}/')]
    assert all(p.split('/')[1] in names[:index] for p in read), (names[index], read)
    if config.num_steps == 0:
      check_start_keys(config)
    elif not read:
      check_config(config)
