"""The trainable-parameter tables people quote, each printed with the formula that gives it.

    .venv/bin/python -m experiments.param_tables                      # both models, to stdout
    .venv/bin/python -m experiments.param_tables --model=llama-3.2-1b --tables=ia3,lora_all
    .venv/bin/python -m experiments.param_tables --out=experiments/results/param_tables.md

For Llama-3.2-1B and SmolLM2-135M: bottleneck adapters (Pfeiffer, Houlsby and
parallel, R = 8…256), (IA)³, LoRA r = 4…64 on q,v and on all seven projections,
prompt and prefix tuning at their presets' 20 virtual tokens, ladder side
tuning, Compacter and Compacter++ (reduction factor 4…16), LoReFT (r = 1…16), P-tuning,
LLaMA-Adapter and AdapterHub's prefix (MAM's); each
row gives the trainable parameters, their % of the base, and the adapter file's size in fp32 and bf16. Below the Llama tables, a note on the
figures commonly quoted wrongly for it.

Every count comes from `additive_jax.peft.param_count`: the leaves the method's own
init builds, traced with `jax.eval_shape` (no weights), checked against the
method's `num_params` formula as count checks them. The formula printed above
each table is the tool's own literal: it is evaluated on every row and must
give the same number, so a printed formula cannot drift from the code. File
sizes are measured by writing the file (see `measure`). `--tables` takes the
names in TABLES (pfeiffer, ..., ladder), `--model` one of the two models.

Shapes: SmolLM2 from the embedded GGUF's metadata (`load_config`, no weights
read); Llama-3.2-1B from its published config.json, copied below.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile

from absl import app, flags
from flax import traverse_util
import ml_dtypes
import numpy as np

from additive_jax import command
from additive_jax.model import embedded
from additive_jax.model.config import LlamaConfig
from additive_jax.model.load import load_config
from additive_jax.peft.param_count import count_methods, leaf_shapes
from additive_jax.peft.files import aj_format
from additive_jax.peft.files.file_io import write_tensors
from additive_jax.peft.registry import parse_method, presets

LLAMA_NAME = 'llama-3.2-1b'
# https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json, the fields LlamaConfig
# reads (the shapes are what matters here; rope settings are kept so the config is the real one).
LLAMA_3_2_1B = LlamaConfig.from_hf({
    'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
    'vocab_size': 128256, 'hidden_size': 2048, 'intermediate_size': 8192,
    'num_hidden_layers': 16, 'num_attention_heads': 32, 'num_key_value_heads': 8,
    'head_dim': 64, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': True,
    'attention_bias': False, 'mlp_bias': False, 'rope_theta': 500000.0,
    'max_position_embeddings': 131072,
    'rope_scaling': {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                     'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}})
SOURCES = {LLAMA_NAME: 'the published config.json of meta-llama/Llama-3.2-1B',
           embedded.NAME: 'the metadata of the embedded SmolLM2-135M-Instruct GGUF (no weights '
                          'read; the base SmolLM2-135M has the same shapes)'}
TITLES = {LLAMA_NAME: 'Llama-3.2-1B', embedded.NAME: 'SmolLM2-135M'}

ALL_SEVEN = "('q', 'k', 'v', 'o', 'gate', 'up', 'down')"
# The presets' virtual tokens and ladder reduction, read from the presets, not restated.
PROMPT_TOKENS = presets()['prompt'][1]['num_tokens']
PREFIX_TOKENS = presets()['prefix'][1]['num_tokens']
LADDER_REDUCTION = presets()['ladder'][1]['reduction']


@dataclasses.dataclass(frozen=True)
class Table:
  name: str                  # what --tables calls it
  title: str
  call: str                  # the method's constructor call, `{}` where the varied value goes
  symbol: str                # the varied value's name in the formula
  values: tuple
  formula: str               # a Python expression over the shape symbols and `symbol`
  where: str = ''            # what the derived symbols mean, for the reader
  derived: object = None     # value, shapes -> extra symbols (the ladder's side widths)


TABLES = (
    Table('pfeiffer', 'Bottleneck adapter, Pfeiffer (one per layer, after the MLP)',
          'Bottleneck(dim={})', 'R', (8, 16, 32, 64, 128, 256), 'L*(2*D*R + R + D)'),
    Table('houlsby', 'Bottleneck adapter, Houlsby (two per layer: after attention, after the MLP)',
          "Bottleneck(dim={}, placement='houlsby')", 'R', (8, 16, 32, 64, 128, 256),
          '2*L*(2*D*R + R + D)'),
    Table('parallel', "Parallel adapter (one per layer, beside the MLP; Pfeiffer's count)",
          "Bottleneck(dim={}, placement='parallel')", 'R', (8, 16, 32, 64, 128, 256),
          'L*(2*D*R + R + D)'),
    # nothing varies: one row, the call as it is
    Table('ia3', '(IA)³ (l_k, l_v of width K·H and l_ff of width F, per layer)', 'IA3()', '',
          ('',), 'L*(2*K*H + F)'),
    Table('lora_qv', 'LoRA on q, v', "LoRA(rank={}, targets=('q', 'v'))", 'r', (4, 8, 16, 32, 64),
          'L*r*((D + N*H) + (D + K*H))'),
    Table('lora_all', 'LoRA on all seven projections (q, k, v, o, gate, up, down)',
          f'LoRA(rank={{}}, targets={ALL_SEVEN})', 'r', (4, 8, 16, 32, 64),
          'L*r*(2*(D + N*H) + 2*(D + K*H) + 3*(D + F))'),
    Table('prompt', f'Prompt tuning, n = {PROMPT_TOKENS} virtual tokens (the `prompt` preset)',
          'PromptTuning(num_tokens={})', 'n', (PROMPT_TOKENS,), 'n*D'),
    Table('prefix', f'Prefix tuning, n = {PREFIX_TOKENS} virtual tokens (the `prefix` preset; no '
          'reparameterization MLP, as trained and as saved)',
          'PrefixTuning(num_tokens={})', 'n', (PREFIX_TOKENS,), 'L*n*2*K*H'),
    Table('ladder', f'Ladder side tuning, reduction r (`ladder` preset: r = {LADDER_REDUCTION})',
          'LadderSide(reduction={})', 'r', (4, LADDER_REDUCTION, 16),
          'L*(R*h*(2*N + 2*K) + 3*R*f + 2*R) + (L + 1)*D*R + L + R + R*D',
          where="R = D/r, f = F/r, h = H/r: the side network's widths; no biases in these models",
          derived=lambda r, s: {'R': s['D'] // r, 'f': s['F'] // r, 'h': s['H'] // r}),
    # reduction factors whose R both models' phm_dim = 4 divides (SmolLM2's 32 gives R = 18)
    Table('compacter', 'Compacter (Houlsby placement, two per layer; n = 4, k = 1, one shared rule)',
          'Compacter(reduction_factor={})', 'rf', (4, 8, 16), '2*L*(2*k*(D + R) + R + D) + n*n*n',
          where='R = int(D // rf), n = 4 (phm_dim), k = 1 (phm_rank)',
          derived=lambda rf, s: {'R': int(s['D'] // rf), 'n': 4, 'k': 1}),
    Table('compacterpp', 'Compacter++ (Pfeiffer placement, one per layer after the MLP)',
          "Compacter(reduction_factor={}, placement='pfeiffer')", 'rf', (4, 8, 16),
          'L*(2*k*(D + R) + R + D) + n*n*n',
          where='R = int(D // rf), n = 4 (phm_dim), k = 1 (phm_rank)',
          derived=lambda rf, s: {'R': int(s['D'] // rf), 'n': 4, 'k': 1}),
    Table('loreft', 'LoReFT at every layer, separate prefix and suffix interventions (DiReFT and '
          'NoReFT count the same)', 'ReFT(rank={}, suffix_positions=3)', 'r', (1, 4, 8, 16),
          'L*2*(2*D*r + r)'),
    Table('ptuning', 'P-tuning, n = 20 virtual tokens through the MLP encoder of width R (the '
          '`ptuning` preset: R = 128)', 'PTuning(num_tokens=20, encoder_hidden={})', 'R',
          (128, 512), 'n*D + 2*D*R + R*R + 2*R + D', where='n = 20',
          derived=lambda r, s: {'n': 20}),
    Table('adaption_prompt', 'LLaMA-Adapter, n = 10 prompt vectors in the top l layers',
          'AdaptionPrompt(num_tokens=10, num_layers={})', 'l', (4, 8, 16), 'l*(n*D + 1)',
          where='n = 10', derived=lambda l, s: {'n': 10}),
    Table('prefix_adapterhub', "Prefix tuning in AdapterHub's form, n = 30 through an MLP of "
          'width R reading [n, D] (the `mam` combination: R = 800; inference holds L*n*2*K*H)',
          "PrefixTuning(num_tokens=30, projection_dim={}, embedding_width='hidden', "
          "positions='from_zero')", 'R', (512, 800), 'n*D + D*R + R + 2*L*K*H*(R + 1)',
          where='n = 30', derived=lambda r, s: {'n': 30}),
)

@dataclasses.dataclass(frozen=True)
class Row:
  method: str                # the constructor call, as `count` prints it
  trainable: int
  percent: float             # of the base
  fp32_bytes: int            # the adapter's safetensors file, as written
  bf16_bytes: int


def shape_symbols(config: LlamaConfig) -> dict[str, int]:
  return {'L': config.num_layers, 'D': config.hidden_size, 'F': config.intermediate_size,
          'N': config.num_heads, 'K': config.num_kv_heads, 'H': config.head_dim,
          'V': config.vocab_size}


def evaluate(formula: str, symbols: dict[str, int]) -> int:
  # Only this file's literal formulas come here, never input: eval without builtins is enough.
  return eval(formula, {'__builtins__': {}}, dict(symbols))  # pylint: disable=eval-used


def trainable(method, config: LlamaConfig) -> int:
  """The `count_methods` figure of one method, refused if its formula and leaves disagree."""
  (c,) = count_methods((method,), config)
  if c.formula != c.leaves:
    raise AssertionError(f'{c.method}: formula gives {c.formula:,}, leaves {c.leaves:,}')
  return c.leaves


def measure(method, config: LlamaConfig, scratch: str) -> Row:
  """One row: the count and the file sizes, from one trace of the method's leaves.

  `leaf_shapes` is what `count_methods` sums; tracing the base costs ~0.07 s, so a row traces
  it once rather than once for the count and once for the file, and checks the sum against
  the method's `num_params` as count does. The file is measured by writing zero leaves of
  those shapes with our format's writer (`aj_format.save`, what `save_adapter(format='aj')`
  calls after checking the tree, a check that would trace the base again): it holds fp32;
  the bf16 file is the same tensors under the same names written as BF16. Zeros are calloc'd
  pages and the scratch folder is in memory, so even a 45M-parameter adapter costs a fraction
  of a second. The JSON written beside the tensors is not counted."""
  shapes = leaf_shapes((method,), config)
  leaves = sum(math.prod(shape) for shape in shapes.values())
  if leaves != method.num_params(config):
    raise AssertionError(f'{method.call_string()}: formula gives {method.num_params(config):,}, '
                         f'leaves {leaves:,}')
  fp32 = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
  directory = os.path.join(scratch, 'adapter')
  os.makedirs(directory, exist_ok=True)
  aj_format.save(directory, (method,), traverse_util.unflatten_dict(fp32, sep='/'), config)
  bf16_path = os.path.join(scratch, 'bf16.safetensors')
  write_tensors(bf16_path, {name: np.zeros(shape, ml_dtypes.bfloat16)
                            for name, shape in shapes.items()})
  return Row(method.call_string(), leaves, 100 * leaves / config.num_base_params,
             os.path.getsize(os.path.join(directory, aj_format.WEIGHTS_NAME)),
             os.path.getsize(bf16_path))


def table_rows(table: Table, config: LlamaConfig, scratch: str) -> list[tuple[object, Row]]:
  """(the varied value, its row) for each of the table's values, each checked against the
  table's printed formula."""
  rows = []
  shapes = shape_symbols(config)
  for value in table.values:
    row = measure(parse_method(table.call.format(value)), config, scratch)
    symbols = {**shapes, table.symbol: value} if table.symbol else dict(shapes)
    if table.derived:
      symbols.update(table.derived(value, shapes))
    by_formula = evaluate(table.formula, symbols)
    if by_formula != row.trainable:
      raise AssertionError(f'{row.method}: the printed formula gives {by_formula:,}, count '
                           f'{row.trainable:,}')
    rows.append((value, row))
  return rows


def pretty(formula: str) -> str:
  return formula.replace('*', '·')


def mib(n: int) -> str:
  return f'{n / 2**20:,.2f} MiB'


def render_table(table: Table, rows: list[tuple[object, Row]], config: LlamaConfig) -> str:
  s = shape_symbols(config)
  # the base's shapes the formula names (the ladder's through its side widths)
  named = re.findall(r'[A-Za-z]+', table.formula + ' ' + table.where)
  used = dict.fromkeys(n for n in named if n in s)
  values = ', '.join(f'{n} = {s[n]:,}' for n in used)
  lines = [f'### {table.title}', '',
           f'`{table.call.format(table.symbol)}`: trainable = **{pretty(table.formula)}**, '
           f'with {values}' + (f'; {table.where}' if table.where else ''), '']
  first = [table.symbol] if table.symbol else []
  header = first + ['method', 'trainable', '% of base', 'file fp32', 'file bf16',
                     'header fp32 / bf16']
  lines += ['| ' + ' | '.join(header) + ' |',
            '|' + '---|' * len(first) + '---|---:|---:|---:|---:|---:|']
  for value, r in rows:
    cells = ([str(value)] if table.symbol else []) + [
        f'`{r.method}`', f'{r.trainable:,}', f'{r.percent:.4f}%', mib(r.fp32_bytes),
        mib(r.bf16_bytes),
        # what the file holds beyond the tensors' bytes: the measurement made visible
        f'{r.fp32_bytes - 4 * r.trainable:,} / {r.bf16_bytes - 2 * r.trainable:,} B']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def render_model(name: str, config: LlamaConfig, tables, scratch: str) -> str:
  s = shape_symbols(config)
  tied = 'tied' if config.tie_word_embeddings else 'untied'
  parts = [f'## {TITLES[name]}',
           f'Shapes from {SOURCES[name]}: L = {s["L"]} layers, D = {s["D"]:,}, F = {s["F"]:,}, '
           f'N = {s["N"]} heads, K = {s["K"]} KV heads, H = {s["H"]} (K·H = {s["K"] * s["H"]:,}), '
           f'V = {s["V"]:,}, {tied} embeddings. Base: {config.num_base_params:,} parameters '
           '(the % column divides by it).']
  for table in tables:
    parts.append(render_table(table, table_rows(table, config, scratch), config))
  if name == LLAMA_NAME:
    parts.append(wrong_figures_note(config))
  return '\n\n'.join(parts)


def wrong_figures_note(config: LlamaConfig) -> str:
  """The three Llama-3.2-1B figures commonly quoted wrongly, the wrong one computed by `count`
  on the shape that produces it (or, for LoRA, as quoted) beside the right one."""
  pfeiffer = parse_method('Bottleneck(dim=64)')
  right_bn = trainable(pfeiffer, config)
  wrong_bn = trainable(pfeiffer, config.replace(hidden_size=4096))
  right_ia3 = trainable(parse_method('IA3()'), config)
  wrong_ia3 = trainable(parse_method('IA3()'), config.replace(num_kv_heads=4))
  lora = trainable(parse_method(f'LoRA(rank=16, targets={ALL_SEVEN})'), config)
  missing_kv_a = config.num_layers * 16 * 2 * config.hidden_size
  kv = config.num_kv_heads * config.head_dim
  return '\n'.join([
      '### Figures commonly quoted wrongly for Llama-3.2-1B', '',
      '* **Bottleneck tables computed with D = 4096** (the width of the 7B and 8B Llamas) for a '
      f'1B model whose D is {config.hidden_size:,}: Pfeiffer at R = 64 is {right_bn:,}, not '
      f'{wrong_bn:,}; every row of such a table is about twice the true count.',
      f'* **(IA)³ computed with a KV width of 256**: Llama-3.2-1B has K·H = '
      f'{config.num_kv_heads} × {config.head_dim} = {kv}, so (IA)³ is '
      f'{config.num_layers}·(2·{kv} + {config.intermediate_size}) = {right_ia3:,}, not '
      f'{wrong_ia3:,}.',
      f'* **LoRA r = 16 on all seven projections quoted as 10.2M**: it is {lora:,}. (One way '
      f'to arrive at 10.2M is to leave out the A matrices of k and v, L·r·2·D = '
      f'{missing_kv_a:,}: {lora - missing_kv_a:,}.)'])


def method_note() -> str:
  return ('Every count is `additive_jax.peft.param_count` on the method built from its constructor call '
          '(its leaves, traced with `jax.eval_shape`, equal to its `num_params` formula), and the '
          'formula printed above each table is evaluated on every row and gives the same figure. '
          'File sizes are measured: each adapter is written in our format (the writer of '
          "`aj.peft.save_adapter(..., format='aj')`) from zero leaves of those shapes, and its "
          f'`{aj_format.WEIGHTS_NAME}` is weighed (fp32, the format\'s dtype); the bf16 size is '
          'the same tensors under the same names written as BF16 safetensors. Either is 4 or 2 '
          'bytes a parameter plus the safetensors header (8 bytes and a JSON index of the '
          'tensors), whose measured size is the last column; the small JSON config written beside '
          'the tensors is not counted. MiB = 2²⁰ bytes.')


def scratch_folder() -> tempfile.TemporaryDirectory:
  """Where the adapters are written to be weighed: in memory (/dev/shm) where there is one, so
  that they never reach a disk."""
  return tempfile.TemporaryDirectory(dir='/dev/shm' if os.path.isdir('/dev/shm') else None,
                                     prefix='param_tables_')


def render(names: list[str], tables=TABLES) -> str:
  with scratch_folder() as scratch:
    models = [render_model(name, LLAMA_3_2_1B if name == LLAMA_NAME else load_config(name),
                           tables, scratch) for name in names]
  return '\n\n'.join(['# Trainable parameters, with their formulas', method_note()] + models) + '\n'


def define_flags() -> None:
  flags.DEFINE_enum('model', 'all', ['all', LLAMA_NAME, embedded.NAME], 'which model')
  flags.DEFINE_list('tables', [t.name for t in TABLES],
                    f'which tables (default: all of {",".join(t.name for t in TABLES)})')
  flags.register_validator('tables', lambda names: set(names) <= {t.name for t in TABLES},
                           f'each table must be one of {", ".join(t.name for t in TABLES)}')
  flags.DEFINE_string('out', None, 'also write the tables as Markdown to this path')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  options = flags.FLAGS
  names = [LLAMA_NAME, embedded.NAME] if options.model == 'all' else [options.model]
  markdown = render(names, [t for t in TABLES if t.name in options.tables])
  if options.out:
    os.makedirs(os.path.dirname(os.path.abspath(options.out)), exist_ok=True)
    with open(options.out, 'w', encoding='utf-8') as f:
      f.write(markdown)
  print(markdown, end='')


if __name__ == '__main__':
  # The flags exist only when this runs as a command, so that the tables can be imported (the
  # tests do) into a process where other modules own --model and --out (additive_jax.export).
  define_flags()
  command.run(main)
