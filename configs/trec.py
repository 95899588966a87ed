r"""SmolLM2-135M-Instruct on TREC question types: one method (default Pfeiffer), accuracy
before and after.

    .venv/bin/python -m additive_jax.main --config=configs/trec.py --workdir=/tmp/trec_pfeiffer
    .venv/bin/python -m additive_jax.main --config=configs/trec.py:lora --workdir=/tmp/trec_lora

The argument names method presets as in configs/sst2.py, and `runlocal` shrinks the
run to a smoke test. Six-way accuracy by the label words' log-likelihood
(` abbreviation`, ` description`, ` entity`, ` person`, ` location`, ` number`) on
TREC's 500 test questions; dev is the last 10% of train (TREC has no dev split).
The run matches configs/sst2.py's (60 steps of 8 packed rows of 128 tokens): a
question and its label are about 15 tokens, so a step sees about 60 questions.
"""

from additive_jax.train.config import default_config, parse_arg, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  c.data.source.name = 'trec'  # the built-in declaration (additive_jax/data/builtins.py)
  c.data.split = 'train'
  c.data.eval_split = 'dev'
  c.batch_size = 8
  c.seq_len = 128
  c.num_steps = 60
  c.log_every = 5
  c.eval_every = 30
  c.eval_batches = 4
  c.checkpoint_every = 30
  c.test_metric, c.test_split = 'accuracy', 'test'
  if args['runlocal']:
    c.batch_size, c.seq_len, c.num_steps = 2, 64, 4
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 2, 1, 2
    c.test_limit = 16
  c.lock()
  return c
