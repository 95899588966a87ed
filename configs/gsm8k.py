r"""SmolLM2-135M-Instruct on GSM8K with one method (default LoRA), chat template.

    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py --workdir=/tmp/gsm8k_lora
    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py:pfeiffer --workdir=/tmp/gsm8k_pfeiffer
    .venv/bin/python -m additive_jax.main --config=configs/gsm8k.py:prefix,runlocal --workdir=/tmp/smoke

The argument names a method preset (pfeiffer, houlsby, parallel, ia3, lora,
prompt, prefix, ladder; several for a combination) and `runlocal` shrinks the
run to a smoke test. Each question is the user turn and its worked answer
(ending `#### <number>`) the assistant turn of SmolLM2's chat template; rows of
512 tokens hold one or two packed examples. On 2 CPU cores a step takes about
20 s, so full runs belong on an accelerator; `runlocal` is the CPU smoke run.
Evaluation is the loss on the test split (exact match needs generation).
"""

from additive_jax.train.config import default_config, parse_arg, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('lora',)))
  c.data.source = 'gsm8k'
  c.data.split = 'train'
  c.data.eval_split = 'test'
  c.data.template = 'chat'
  c.batch_size = 16
  c.seq_len = 512
  c.num_steps = 1000
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  if args['runlocal']:
    c.batch_size, c.seq_len, c.num_steps = 2, 256, 3
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 3, 1, 3
  c.lock()
  return c
