"""experiments/param_tables.py: the quoted figures against formulas computed here, against a
real init and a real save, and the command's output (tables, formulas, the wrong figures)."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest

import additive_jax as aj
from additive_jax.model.llama import abstract_params
from cli_helpers import ROOT, USER_ENV
from conftest import LLAMA_3_2_1B, SMOLLM2

# Loaded from its file: experiments/ is not a package on the tests' path. It defines its flags
# only when run as a command, so importing it here clashes with no other module's --out.
_SPEC = importlib.util.spec_from_file_location(
    'param_tables', os.path.join(ROOT, 'experiments', 'param_tables.py'))
tables = sys.modules['param_tables'] = importlib.util.module_from_spec(_SPEC)  # for its dataclasses
_SPEC.loader.exec_module(tables)


@pytest.fixture(scope='module')
def scratch():
  with tables.scratch_folder() as folder:
    yield folder


def row(name, value, config, scratch):
  """The tool's row of table `name` at `value` (the table cut to that one value)."""
  table = dataclasses.replace(next(t for t in tables.TABLES if t.name == name), values=(value,))
  ((_, measured),) = tables.table_rows(table, config, scratch)
  return measured


def test_the_tool_describes_llama_3_2_1b_as_its_published_config():
  assert tables.LLAMA_3_2_1B == LLAMA_3_2_1B  # conftest's, from the same config.json


def test_lora_r16_on_all_seven_projections_of_llama_is_11_272_192(scratch):
  d, nh, kh, f = 2048, 32 * 64, 8 * 64, 8192
  expected = 16 * 16 * (2 * (d + nh) + 2 * (d + kh) + 3 * (d + f))  # L·r·Σ(in + out)
  assert row('lora_all', 16, tables.LLAMA_3_2_1B, scratch).trainable == expected == 11_272_192


def test_ia3_on_llama_counts_a_kv_width_of_512(scratch):
  expected = 16 * (2 * 512 + 8192)  # L·(2·K·H + F), K·H = 8 × 64
  assert row('ia3', '', tables.LLAMA_3_2_1B, scratch).trainable == expected == 147_456


@pytest.mark.parametrize('dim', [8, 64])
def test_pfeiffer_rows_follow_the_formula_with_d_2048(dim, scratch):
  expected = 16 * (2 * 2048 * dim + dim + 2048)  # L·(2·D·R + R + D)
  assert row('pfeiffer', dim, tables.LLAMA_3_2_1B, scratch).trainable == expected


def test_smollm2_lora_r8_on_q_v_follows_the_formula(scratch):
  config = tables.load_config(SMOLLM2)  # as the tool reads it: the GGUF's metadata
  # SmolLM2-135M as DESIGN.md gives it: 30 layers, D 576, 9 heads, 3 KV heads, head dim 64
  layers, d, nh, kh = 30, 576, 9 * 64, 3 * 64
  expected = layers * 8 * ((d + nh) + (d + kh))  # L·r·((D + N·H) + (D + K·H))
  assert row('lora_qv', 8, config, scratch).trainable == expected == 460_800


def test_count_and_file_size_match_a_real_init_and_save(scratch, tmp_path):
  """The tool's count and fp32 file size of a Pfeiffer adapter, R = 8, against the leaves the
  model actually initializes (the base passed as shapes: the adapter's init reads none of it)
  and the file `save_adapter` actually writes from them."""
  measured = row('pfeiffer', 8, tables.LLAMA_3_2_1B, scratch)
  model = aj.Llama(tables.LLAMA_3_2_1B, peft=(aj.peft.Bottleneck(dim=8),))
  peft = model.init_peft(jax.random.key(0), abstract_params(tables.LLAMA_3_2_1B))['peft']
  assert measured.trainable == sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(peft))
  aj.peft.save_adapter(str(tmp_path), model.peft, peft, tables.LLAMA_3_2_1B, format='aj')
  assert measured.fp32_bytes == os.path.getsize(tmp_path / 'aj_adapter.safetensors')
  assert 0 < measured.bf16_bytes - 2 * measured.trainable < 4096  # the header, as for fp32


def test_command_prints_each_table_with_its_formula_and_the_note(tmp_path):
  out = tmp_path / 'tables.md'
  result = subprocess.run([sys.executable, '-m', 'experiments.param_tables',
                           '--model=llama-3.2-1b', '--tables=pfeiffer,ia3', f'--out={out}'],
                          cwd=ROOT, env=USER_ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  assert out.read_text() == text  # --out writes what it prints
  assert 'Base: 1,235,814,400 parameters' in text
  assert 'trainable = **L·(2·D·R + R + D)**, with L = 16, D = 2,048' in text
  assert 'trainable = **L·(2·K·H + F)**, with L = 16, K = 8, H = 64, F = 8,192' in text
  assert '| 64 | `Bottleneck(dim=64)` | 4,228,096 | 0.3421% | 16.13 MiB | 8.06 MiB |' in text
  assert '| `IA3()` | 147,456 | 0.0119% |' in text
  assert 'LoRA on' not in text and 'SmolLM2' not in text  # --tables and --model select
  note = text.split('### Figures commonly quoted wrongly', 1)[1]
  # the wrong figure beside the right one: D = 4096, a KV width of 256, LoRA's 10.2M
  assert '4,228,096, not 8,455,168' in note
  assert '= 147,456, not 139,264' in note
  assert 'quoted as 10.2M**: it is 11,272,192' in note
