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

from additive_jax.train.config import default_config, parse_arg, task_run, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  task_run(c, 'trec', args['runlocal'])  # configs/sst2.py's run; dev held out from train
  c.lock()
  return c
