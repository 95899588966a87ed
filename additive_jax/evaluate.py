"""Task metrics of a finished run, or of a base model alone.

    python -m additive_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--split=test]
        [--metric=accuracy,exact_match,perplexity] [--limit=N] [--decode_rows=64]
    python -m additive_jax.evaluate --model=smollm2-135m-instruct --source=sst2 --split=test \\
        --metric=accuracy [--template=plain|chat] [--output=zero_shot.json]

With `--workdir`, the run's trainables at the checkpoint are scored on `--split`
of the run's own data declaration and template (default: the run's test split
and test metric), and `eval_<split>.json` is written into the workdir. With
`--model` and a built-in `--source` instead, the base alone is scored: a
paper's zero-shot row. Prints one line per metric; `--limit` scores a fixed-seed
subset of that many rows. The metrics are those of additive_jax/eval/metrics.py.
"""

import json
import sys

from absl import app, flags
from etils import epath
import ml_collections

from additive_jax import command
from additive_jax.data.config import data_config
from additive_jax.eval.metrics import Settings, check_metric, score
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_model
from additive_jax.model.quant_layout import MODES
from additive_jax.model.tokenizer import load_tokenizer
from additive_jax.train.restore import restore_run
from additive_jax.train.workdir import RunFolder

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run to score')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', "the run's checkpoint: latest, best or a step")
_MODEL = flags.DEFINE_string('model', None, 'a base to score alone (HF directory, .gguf, embedded)')
_SOURCE = flags.DEFINE_string('source', None, 'with --model: a built-in data source')
_TEMPLATE = flags.DEFINE_enum('template', 'plain', ('plain', 'chat'), 'with --model: the template')
_SPLIT = flags.DEFINE_string('split', None, "the split (default: a run's test split, else test)")
_METRICS = flags.DEFINE_list('metric', None, "metrics (default: a run's test metric)")
_LIMIT = flags.DEFINE_integer('limit', 0, 'a fixed-seed subset of this many rows (0: all)')
_OUTPUT = flags.DEFINE_string('output', None, "the JSON written (default: a run's eval_<split>.json)")
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'exact_match: the budget')
_BASE_QUANT = flags.DEFINE_enum('base_quant', None, MODES,
                                "the base in blocks (default: a run's own, else none)")
_DECODE_ROWS = flags.DEFINE_integer('decode_rows', Settings.decode_rows,
                                    'exact_match: prompts decoded together', lower_bound=1)


def setup():
  """(base path, variables' peft or None, methods, data config, split, metrics, settings,
  output path, what was scored, the base's (quant, quant_block)) from the flags and, with
  --workdir, the run (scored over the base it trained over)."""
  if bool(_WORKDIR.value) == bool(_MODEL.value):
    raise app.UsageError('give --workdir=DIR (a run) or --model=BASE --source=NAME (the base)')
  if _WORKDIR.value:
    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    config = ml_collections.ConfigDict(run.config)
    split = _SPLIT.value or config.test_split or config.data.eval_split
    metrics = _METRICS.value or [config.test_metric or config.eval_metric or 'perplexity']
    settings = Settings(batch_size=config.batch_size, seq_len=config.seq_len,
                        max_new_tokens=_MAX_NEW_TOKENS.value or config.max_new_tokens,
                        answer_regex=config.answer_regex, decode_rows=_DECODE_ROWS.value)
    output = _OUTPUT.value or str(RunFolder(_WORKDIR.value).eval_output(split))
    quant = (_BASE_QUANT.value or config.get('base_quant', 'none'),
             config.get('base_quant_block', 0))
    return (config.model, run.peft, run.methods, config.data, split, metrics, settings, output,
            {'workdir': _WORKDIR.value, 'step': run.step}, quant)
  if not _SOURCE.value:
    raise app.UsageError('--model needs --source, the data to score on')
  data = data_config()
  data.source.name = _SOURCE.value
  data.template = _TEMPLATE.value
  metrics = _METRICS.value or ['perplexity']
  settings = Settings(max_new_tokens=_MAX_NEW_TOKENS.value or Settings.max_new_tokens,
                      decode_rows=_DECODE_ROWS.value)
  return (_MODEL.value, None, (), data, _SPLIT.value or 'test', metrics, settings, _OUTPUT.value,
          {'model': _MODEL.value}, (_BASE_QUANT.value or 'none', 0))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    base, peft, methods, data, split, metrics, settings, output, scored, quant = setup()
    for metric in metrics:
      check_metric(metric)
    config, params = load_model(base, quant=quant[0], quant_block=quant[1])
    tokenizer = load_tokenizer(base)
    model = Llama(config, peft=methods)
    variables = {'params': params} if peft is None else {'params': params, 'peft': peft}
    results = {metric: score(metric, model, variables, tokenizer, data, split, _LIMIT.value,
                             settings) for metric in metrics}
  except (ValueError, OSError) as err:
    sys.exit(f'error: {err}')
  for metric, result in results.items():
    details = ', '.join(f'{k} {v:g}' for k, v in result.items() if k != metric)
    print(f'{metric} on {split}: {result[metric]:.4f} ({details})')
  if output:
    record = {**scored, 'split': split, 'limit': _LIMIT.value, 'results': results}
    staged = epath.Path(output + '.tmp')  # written whole, then renamed: never half a file
    staged.write_text(json.dumps(record, indent=2), encoding='utf-8')
    staged.replace(output)


if __name__ == '__main__':
  command.run(main)
