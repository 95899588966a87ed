"""`python -m additive_jax.combine`: a run and an adapter file merged into a PEFT file, adapter
files averaged, the base taken from what the adapters record, and bad input refused in one line
with nothing written."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import additive_jax as aj
from additive_jax.combine import combine, parse_weights
from additive_jax.model.load import load_config
from additive_jax.train.restore import restore_run
from adapter_files_helpers import assert_same_leaves, random_peft
from cli_helpers import ROOT, moving_run
from conftest import xla_flags

LORA = aj.peft.LoRA(rank=4, alpha=8, targets=('q', 'v'))
BOTTLENECK = aj.peft.Bottleneck(8, 'houlsby')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny_with_tokenizer, small_sst2):
  """A one-step LoRA run at a high learning rate, so that B moves off zero."""
  return moving_run(tiny_with_tokenizer, small_sst2, LORA, tmp_path_factory.mktemp('run'), steps=1)


def saved(directory, methods, seed, base, format='aj'):
  """Random leaves of `methods` written to `directory`, naming `base`; (methods, peft)."""
  config = load_config(base)
  peft = random_peft(methods, config, seed)
  aj.peft.save_adapter(str(directory), methods, peft, config, format=format,
                       base_model_name_or_path=base)
  return methods, peft


def run_combine(*args):
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  return subprocess.run([sys.executable, '-m', 'additive_jax.combine', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_run_and_a_peft_file_merge_into_a_peft_file(workdir, tiny_with_tokenizer, tmp_path):
  other = saved(tmp_path / 'other', (LORA,), 1, tiny_with_tokenizer, format='hf_peft')
  out = str(tmp_path / 'merged')
  result = run_combine(f'--adapter={workdir}', f'--adapter={tmp_path / "other"}', '--how=ties',
                       '--density=0.5', '--weights=0.6,-0.4', f'--out={out}', '--format=hf_peft')
  assert result.returncode == 0 and result.stdout.strip() == f'wrote {out}', result.stderr[-3000:]
  run = restore_run(workdir)
  methods, peft = aj.peft.merge_lora([(run.methods, run.peft), other], [0.6, -0.4], 'ties',
                                     density=0.5)
  assert np.abs(run.peft['lora']['q']['b']).max() > 0  # the run's B has left zero
  loaded = aj.peft.load_adapter(out, load_config(tiny_with_tokenizer))
  assert loaded[0] == methods == (aj.peft.LoRA(4, 4, ('q', 'v')),)
  for target in ('q', 'v'):
    for leaf in ('a', 'b'):
      np.testing.assert_allclose(loaded[1]['lora'][target][leaf], peft['lora'][target][leaf],
                                 rtol=1e-6, atol=1e-7)


def test_adapter_files_average_as_aj_peft_average(tiny_with_tokenizer, tmp_path):
  adapters = [saved(tmp_path / str(i), (BOTTLENECK,), i, tiny_with_tokenizer, format)
              for i, format in enumerate(('aj', 'adapterhub', 'aj'))]
  out = combine([str(tmp_path / str(i)) for i in range(3)], str(tmp_path / 'mean'))
  methods, peft = aj.peft.load_adapter(out, load_config(tiny_with_tokenizer))
  want = aj.peft.average(adapters)
  assert methods == want[0]
  assert_same_leaves(peft, jax.tree.map(np.asarray, want[1]))


def test_dare_draws_its_masks_from_the_seed(tiny_with_tokenizer, tmp_path):
  paths = [str(tmp_path / str(i)) for i in range(2)]
  for i, path in enumerate(paths):
    saved(path, (LORA,), i, tiny_with_tokenizer)
  config = load_config(tiny_with_tokenizer)
  read = lambda out: np.asarray(aj.peft.load_adapter(out, config)[1]['lora']['q']['a'])
  first, again, other = (read(combine(paths, str(tmp_path / f'out{n}'), 'dare_linear',
                                      density=0.5, seed=seed))
                         for n, seed in enumerate((0, 0, 1)))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


@pytest.mark.parametrize('how, options, message', [
    ('average', {'density': 0.5}, r'--density is for the LoRA merges \(ties, .*\), not --how=average'),
    ('average', {'rank': 2}, '--rank is for --how=lora_delta_w_svd and the _svd merges, not '
     '--how=average'),
    ('average', {'weights': [1.0]}, '--weights has 1 values for 2 adapters'),
    ('mean', {}, "--how must be one of average, .*, got 'mean'"),
    ('svd', {}, r'merge_lora: adapter 0 holds Bottleneck\(dim=8, placement=.houlsby.\); it merges '
     'adapters of one LoRA each'),
])
def test_bad_combinations_are_named(tiny_with_tokenizer, tmp_path, how, options, message):
  paths = [str(tmp_path / str(i)) for i in range(2)]
  for i, path in enumerate(paths):
    saved(path, (BOTTLENECK,), i, tiny_with_tokenizer)
  with pytest.raises(ValueError, match=message):
    combine(paths, str(tmp_path / 'out'), how, **options)
  assert not os.path.exists(tmp_path / 'out')


def test_the_base_must_be_named_once(tiny_with_tokenizer, tmp_path):
  saved(tmp_path / 'a', (LORA,), 0, tiny_with_tokenizer)
  saved(tmp_path / 'b', (LORA,), 1, tiny_with_tokenizer, format='hf_peft')
  aj.peft.save_adapter(str(tmp_path / 'c'), (LORA,), random_peft((LORA,), load_config(
      tiny_with_tokenizer)), load_config(tiny_with_tokenizer), base_model_name_or_path='elsewhere')
  with pytest.raises(ValueError, match=r'the adapters record different base models \(.*/a: '
                     r'.*, .*/c: elsewhere\); name the one to combine them for with --model'):
    combine([str(tmp_path / 'a'), str(tmp_path / 'c')], str(tmp_path / 'out'))
  out = combine([str(tmp_path / 'a'), str(tmp_path / 'c')], str(tmp_path / 'out'),
                model=tiny_with_tokenizer)  # --model settles it
  assert aj.peft.load_adapter(out, load_config(tiny_with_tokenizer))[0] == (LORA,)
  aj.peft.save_adapter(str(tmp_path / 'd'), (LORA,), random_peft((LORA,), load_config(
      tiny_with_tokenizer)), load_config(tiny_with_tokenizer))
  with pytest.raises(ValueError, match=r'--adapter=.*/d records no base model; name it with --model'):
    combine([str(tmp_path / 'b'), str(tmp_path / 'd')], str(tmp_path / 'out2'))


def test_a_format_that_cannot_hold_the_result_is_one_line_and_writes_nothing(
    tiny_with_tokenizer, tmp_path):
  for i in range(2):
    saved(tmp_path / str(i), (BOTTLENECK,), i, tiny_with_tokenizer)
  out = tmp_path / 'out'
  result = run_combine(f'--adapter={tmp_path / "0"}', f'--adapter={tmp_path / "1"}',
                       f'--out={out}', '--format=hf_peft')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: Bottleneck(dim=8, placement='houlsby') has no Hugging Face PEFT equivalent (PEFT "
      'files hold LoRA, (IA)³, prompt tuning, P-tuning, prefix tuning or adaption prompts); use '
      'format="aj" or "adapterhub"')
  assert not out.exists()


def test_bad_flags_are_named(tmp_path):
  with pytest.raises(ValueError, match='--weights=0.5,x: each weight must be a number'):
    parse_weights(['0.5', 'x'])
  with pytest.raises(ValueError, match='give the adapters to combine: --adapter=PATH, repeated'):
    combine([], str(tmp_path / 'out'))
  with pytest.raises(ValueError, match=f'{tmp_path / "nowhere"} is not a directory'):
    combine([str(tmp_path / 'nowhere')], str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')
