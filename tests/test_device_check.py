"""benchmarks/device_check.py --dry: every part runs at toy size on this CPU ('pallas' in
Pallas's interpreter) and its JSON holds what a device run's would; a budget too small for
the later parts skips them and still writes a JSON naming them. The script runs as a
command, as on a device: two runs at once, the budgeted one short."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from additive_jax.model import kernel_probe
from conftest import xla_flags

SCRIPT = Path(__file__).resolve().parent.parent / 'benchmarks' / 'device_check.py'
PARTS = ['equivalence', 'probe', 'train', 'throughput', 'decode']


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """{'full': the JSON of a whole dry run, 'budget': of one with --budget_s=1}."""
  folder = tmp_path_factory.mktemp('device_check')
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  env.pop('PYTHONSAFEPATH', None)  # the script imports the modules beside it
  flags = {'full': [], 'budget': ['--budget_s=1', '--parts=probe,train,decode']}
  runs = {name: subprocess.Popen([sys.executable, str(SCRIPT), '--dry',
                                  f'--out={folder / name}.json', *extra], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
          for name, extra in flags.items()}
  found = {}
  for name, run in runs.items():
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-3000:]
    found[name] = json.loads((folder / f'{name}.json').read_text(encoding='utf-8'))
  return found


def test_a_dry_run_does_every_part_and_names_its_machine(records):
  record = records['full']
  assert record['mode'] == 'dry' and record['parts_done'] == PARTS
  assert record['parts_skipped'] == [] and record['parts_failed'] == []
  assert set(record['results']) == set(PARTS)
  assert record['machine']['backend'] == 'cpu' and record['kernels'] == ['pallas']
  assert record['machine']['versions']['jax'] and record['machine']['versions']['torch']
  assert record['verified'] == []  # entries come from a GPU or TPU alone
  assert record['result_name'].startswith('device_check_cpu_')


def test_the_kernel_agrees_with_xla_in_every_case(records):
  cases = records['full']['results']['equivalence']['cases']
  kinds = {(c['layout'], c['num_prefix'], c['num_virtual'], c['dtype']) for c in cases}
  assert len(cases) == len(kinds) == 16  # 4 layouts, without and with slots, fp32 and bf16
  for case in cases:
    forward, grads = kernel_probe.TOLERANCE[case['dtype']]
    out, *grad_errors = case['rel_error_out_dq_dk_dv']
    assert 0 < out <= forward and 0 < max(grad_errors) <= grads, case
    assert case['passed']


def test_the_probe_keeps_the_kernel_and_auto_takes_xla(records):
  rows = records['full']['results']['probe']['rows']
  assert {r['requested'] for r in rows} == {'auto', 'pallas'} and len(rows) == 8
  for row in rows:
    assert row['runs'] == ('xla' if row['requested'] == 'auto' else 'pallas'), row
  assert all('Pallas interpreter' in r['line'] for r in rows if r['requested'] == 'pallas')


def test_the_kernel_trains_with_the_losses_of_xla(records):
  train = records['full']['results']['train']
  want, got = train['losses']['xla'], train['losses']['pallas']
  assert len(want) == len(got) == train['steps'] == 3
  for a, b in zip(got, want):
    assert math.isfinite(a) and abs(a - b) <= 1e-5 * abs(b)
  assert train['kernels']['pallas']['passed']


def test_the_throughput_and_decode_parts_measure(records):
  throughput = records['full']['results']['throughput']
  assert throughput['attention'] == 'xla'  # 'auto' on a CPU
  for key in ('ours_tokens_per_s', 'theirs_tokens_per_s', 'ours_over_theirs', 'ours_mfu'):
    assert throughput[key] > 0, key
  ours_loss, theirs_loss = throughput['step_1_loss_ours_theirs']
  assert abs(ours_loss - theirs_loss) <= 1e-4 * theirs_loss  # the same step on both sides
  decode = records['full']['results']['decode']
  for batch in ('batch_1', 'batch_64'):
    assert decode[batch]['ours_ms_per_token'] > 0 and decode[batch]['theirs_ms_per_token'] > 0
  assert decode['greedy_tokens_agreeing'] == decode['new_tokens']


def test_a_small_budget_skips_the_later_parts_and_names_them(records):
  record = records['budget']
  assert record['parts_requested'] == ['probe', 'train', 'decode']
  assert record['parts_done'] == ['probe'] and record['parts_failed'] == []
  assert [s['part'] for s in record['parts_skipped']] == ['train', 'decode']
  assert all('--budget_s=1' in s['why'] for s in record['parts_skipped'])
  assert set(record['results']) == {'probe'} and record['elapsed_s'] > 0
