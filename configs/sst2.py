r"""SmolLM2-135M-Instruct on SST-2: one method (default Pfeiffer), accuracy before and after.

    .venv/bin/python -m additive_jax.main --config=configs/sst2.py --workdir=/tmp/sst2_pfeiffer
    .venv/bin/python -m additive_jax.main --config=configs/sst2.py:lora --workdir=/tmp/sst2_lora
    .venv/bin/python -m additive_jax.main --config=configs/sst2.py:ia3,runlocal --workdir=/tmp/smoke

The argument names a method preset (pfeiffer, houlsby, parallel, ia3, lora,
prompt, ptuning, prefix, ladder, compacter, compacterpp, loreft, direft, adaption_prompt;
several for a combination; or the combinations mam, unipelt) and `runlocal` shrinks the
run to a smoke test. The default is the README's quickstart: about 5 minutes on
2 CPU cores (60 steps of about 2.1 s, and 50 seconds for each scoring of the
872-row test set).

Plain template (`Review: {sentence}\nSentiment:` → ` positive`/` negative` + EOS),
packed rows of 128 tokens, accuracy by the label words' log-likelihood.
"""

from additive_jax.train.config import default_config, parse_arg, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  c.data.source.name = 'sst2'  # the built-in declaration (additive_jax/data/builtins.py)
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
