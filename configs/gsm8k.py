r"""SmolLM2-135M-Instruct on GSM8K with one method (default LoRA), chat template.

    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py --workdir=/tmp/gsm8k_lora
    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py:pfeiffer --workdir=/tmp/gsm8k_pfeiffer
    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py:prefix,runlocal --workdir=/tmp/smoke

The argument names a method preset (pfeiffer, houlsby, parallel, ia3, lora,
prompt, ptuning, prefix, ladder, compacter, compacterpp, loreft, direft, adaption_prompt,
mam, unipelt; several for a combination) and `runlocal` shrinks the
run to a smoke test. Each question is the user turn and its worked answer
(ending `#### <number>`) the assistant turn of SmolLM2's chat template; rows of
512 tokens hold one or two packed examples. On 2 CPU cores a step takes about
20 s, so full runs belong on an accelerator; `runlocal` is the CPU smoke run.
Scored by exact match of the number after `####` (greedy generation, at most
256 new tokens): a fixed 200-question subset of the test split at every eval,
which keeps the best checkpoint, and the whole 1,319 before and after; the
plain template is `--config.data.template=plain`.
"""

from additive_jax.train.config import default_config, parse_arg, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('lora',)))
  c.data.source.name = 'gsm8k'  # the built-in declaration (additive_jax/data/builtins.py)
  c.data.split = 'train'
  c.data.eval_split = 'test'
  c.data.template = 'chat'
  c.batch_size = 16
  c.seq_len = 512
  c.num_steps = 1000
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  # exact match of the number after '####': a fixed 200-question subset at every eval (the best
  # checkpoint kept by it), the whole test set before and after
  c.eval_metric, c.eval_metric_limit = 'exact_match', 200
  c.test_metric, c.test_split = 'exact_match', 'test'
  c.max_new_tokens = 256
  if args['runlocal']:
    c.batch_size, c.seq_len, c.num_steps = 2, 256, 3
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 3, 1, 3
    c.eval_metric_limit, c.test_limit, c.max_new_tokens = 2, 2, 16
  c.lock()
  return c
