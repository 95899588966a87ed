"""Text from a trained run, or from adapter files trained here or elsewhere.

    python -m additive_jax.generate --workdir=/tmp/additive_jax_quickstart \\
        --prompt=$'Review: a gentle, funny and moving film\\nSentiment:' --max_new_tokens=4
    python -m additive_jax.generate --model=smollm2-135m-instruct --adapter=out/lora --chat \\
        --prompt='What is 7 times 6?' --temperature=0.7 --top_p=0.9 --seed=1
    python -m additive_jax.generate --model=smollm2-135m-instruct --adapter=pos=out/a \\
        --adapter=neg=out/b --prompts=prompts.jsonl --output=answers.jsonl

`--workdir` reads a run's trainables (`--checkpoint=latest|best|STEP`) and its base;
`--model` alone generates with the base (a zero-shot baseline);
`--adapter=[NAME=]DIR` reads adapter files (ours, HF PEFT or AdapterHub, detected
from the files) for the base `--model`, and may be given several times: the
adapters, of one method set, are stacked and every prompt runs its own in the
same batch. `--prompt` streams one completion to the terminal as it is written
(with several adapters, one per adapter); `--prompts` reads JSONL rows
`{"prompt": ..., "adapter": NAME}` (`adapter` needed when several are loaded) and
writes JSONL rows with their `completion` to `--output` (default: the terminal).
`--chat` puts each prompt in the tokenizer's chat template (a run's default: its
own template). Greedy unless `--temperature` > 0; `--stop` strings end a
completion and are not returned.
"""

import json
import os
import sys

from absl import app, flags
from etils import epath

from additive_jax import command
from additive_jax.data.readers import read_jsonl
from additive_jax.eval.decode import generate
from additive_jax.eval.sampling import Sampling
from additive_jax.model.llama import Llama
from additive_jax.model.load import load_config, load_model
from additive_jax.model.quant_layout import MODES
from additive_jax.model.tokenizer import load_tokenizer
from additive_jax.peft.files import load_adapter
from additive_jax.peft.stack import stack
from additive_jax.train.restore import restore_run

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run to generate with')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', "the run's checkpoint: latest, best or a step")
_ADAPTERS = flags.DEFINE_multi_string('adapter', [], '[NAME=]DIR of adapter files; repeatable')
_MODEL = flags.DEFINE_string('model', None, 'the base: HF directory, .gguf or embedded name '
                             "(default: a run's own)")
_PROMPT = flags.DEFINE_string('prompt', None, 'one prompt, streamed')
_PROMPTS = flags.DEFINE_string('prompts', None, 'a JSONL file of {"prompt", "adapter"?} rows')
_OUTPUT = flags.DEFINE_string('output', None, 'where --prompts writes its JSONL (default: stdout)')
_CHAT = flags.DEFINE_bool('chat', None, "the chat template (default: a run's own, else off)")
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'tokens to generate at most')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'keep the k most likely tokens (0: all)')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'keep the nucleus of this probability (1: all)')
_SEED = flags.DEFINE_integer('seed', 0, 'the sampling seed')
_STOP = flags.DEFINE_multi_string('stop', [], 'a string that ends a completion; repeatable')
_BASE_QUANT = flags.DEFINE_enum('base_quant', None, MODES,
                                "the base in blocks (default: a run's own, else none)")


def named_adapters(specs: list[str]) -> dict[str, str]:
  """NAME -> DIR of `--adapter=[NAME=]DIR` (a bare DIR is named by its folder)."""
  adapters = {}
  for spec in specs:
    name, _, directory = spec.rpartition('=') if '=' in spec else ('', '', spec)
    name = name or os.path.basename(os.path.normpath(directory))
    if name in adapters:
      raise ValueError(f'--adapter: the name {name!r} is given twice; name them NAME=DIR')
    adapters[name] = directory
  return adapters


def read_prompts(path: str, names: list[str]) -> list[tuple[str, int]]:
  """(prompt, adapter index) of each JSONL row; an unknown adapter or a missing field is named
  by its line."""
  rows = []
  for line, row in read_jsonl(path):
    if not isinstance(row.get('prompt'), str):
      raise ValueError(f'{path}:{line}: a row needs a "prompt" string')
    name = row.get('adapter', names[0] if len(names) == 1 else None)
    if name is None:
      raise ValueError(f'{path}:{line}: several adapters are loaded ({", ".join(names)}): name '
                       'one in the row\'s "adapter" field')
    if name not in names:
      raise ValueError(f'{path}:{line}: adapter {name!r} is not loaded (loaded: '
                       f'{", ".join(names)})')
    rows.append((row['prompt'], names.index(name)))
  return rows


def load_adapters():
  """(base path, {name: (methods, peft)}, the run's chat default, the run's checkpoint in words,
  the base's (quant, quant_block)) from the flags: a run decodes over the base it trained over."""
  if _WORKDIR.value and _ADAPTERS.value:
    raise app.UsageError('give --workdir=DIR (a run) or --adapter=DIR (adapter files), not both')
  if _WORKDIR.value:
    run = restore_run(_WORKDIR.value, _CHECKPOINT.value)
    model = _MODEL.value or run.config['model']
    quant = (_BASE_QUANT.value or run.config.get('base_quant', 'none'),
             run.config.get('base_quant_block', 0))
    return (model, {'run': (run.methods, run.peft)}, run.config['data']['template'] == 'chat',
            f'{_WORKDIR.value}: step {run.step} ({_CHECKPOINT.value})', quant)
  if not _MODEL.value:
    raise app.UsageError('give --workdir=DIR (a run), --adapter=DIR with --model (adapter files) '
                         'or --model alone (the base)')
  return (_MODEL.value, dict(named_adapters(_ADAPTERS.value)), False, None,
          (_BASE_QUANT.value or 'none', 0))


def write_jsonl(path: str, rows: list[dict]) -> None:
  """All rows, or nothing: written to a temporary name, then renamed."""
  staged = epath.Path(path + '.tmp')
  staged.write_text(''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows),
                    encoding='utf-8')
  staged.replace(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if (_PROMPT.value is None) == (_PROMPTS.value is None):
    raise app.UsageError('give --prompt="..." or --prompts=FILE.jsonl')
  try:
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value)
    base, sources, run_chat, checkpoint, (quant, quant_block) = load_adapters()
    config = load_config(base)  # the adapters are checked against it before a weight is read
    adapters = {name: source if isinstance(source, tuple) else load_adapter(source, config)
                for name, source in sources.items()}
    names = list(adapters) or ['base']  # no adapter: the base alone
    methods, peft = stack(list(adapters.values()), config) if adapters else ((), None)
    if _PROMPT.value is not None:
      rows = [(_PROMPT.value, index) for index in range(len(names))]
    else:
      rows = read_prompts(_PROMPTS.value, names)
    config, params = load_model(base, quant=quant, quant_block=quant_block)
    tokenizer = load_tokenizer(base)
  except (ValueError, OSError) as err:
    sys.exit(f'error: {err}')
  if checkpoint:  # which step `latest` or `best` meant, beside the completion, not in it
    print(checkpoint, file=sys.stderr)
  chat = run_chat if _CHAT.value is None else _CHAT.value
  streaming = _PROMPT.value is not None and len(names) == 1
  stream = (lambda row, text: print(text, end='', flush=True)) if streaming else None
  try:
    variables = {'params': params} if peft is None else {'params': params, 'peft': peft}
    texts = generate(Llama(config, peft=methods), variables, tokenizer,
                     [prompt for prompt, _ in rows], max_new_tokens=_MAX_NEW_TOKENS.value,
                     chat=chat, sampling=sampling, stop=_STOP.value,
                     adapter_ids=None if peft is None else [index for _, index in rows],
                     on_text=stream)
  except ValueError as err:
    sys.exit(f'error: {err}')
  if streaming:
    print()
  elif _PROMPT.value is not None:
    for (_, index), text in zip(rows, texts):
      print(f'[{names[index]}] {text}')
  else:
    out = [{'prompt': prompt, 'adapter': names[index], 'completion': text}
           for (prompt, index), text in zip(rows, texts)]
    if _OUTPUT.value:
      write_jsonl(_OUTPUT.value, out)
    else:
      for row in out:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == '__main__':
  command.run(main)
