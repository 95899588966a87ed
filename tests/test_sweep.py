"""experiments/sweep.py: a product of variants and overrides, each a real run, tabulated."""

import json
import os
import subprocess
import sys

from cli_helpers import ROOT


def test_sweep_runs_each_variant_with_each_override_once(tmp_path, tiny_with_tokenizer):
  out = tmp_path / 'results' / 'sweep'
  command = [sys.executable, 'experiments/sweep.py', '--config=configs/sst2.py', '--variants=ia3',
             '--extra=runlocal', f'--set=model={tiny_with_tokenizer}', '--set=num_steps=2',
             '--set=test_limit=4', '--override=seed=1',
             f'--root={tmp_path / "runs"}', f'--out={out}']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads(out.with_suffix('.json').read_text())['runs']
  assert [(r['variant'], r['override']) for r in runs] == [('ia3', 'seed=1')]
  assert 0 <= runs[0]['accuracy_after'] <= 1
  assert runs[0]['trainable_params'] == 2 * (2 * 16 + 80)  # (IA)³ on 2 layers: L·(2·K·H + F)
  config = json.loads(next((tmp_path / 'runs' / 'ia3__seed=1').glob('checkpoints/*/config/*')).read_text())
  assert config['seed'] == 1 and config['num_steps'] == 2  # the override and the --set reached the run
  assert out.with_suffix('.md').read_text().count('\n') == 3  # header, rule, the run
  assert out.with_suffix('.png').stat().st_size > 0
  # A finished run is not repeated: the second sweep only collects.
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and '$ ' not in again.stdout
