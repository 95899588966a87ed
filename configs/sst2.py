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

from additive_jax.train.config import default_config, parse_arg, task_run, with_methods


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  task_run(c, 'sst2', args['runlocal'])  # 60 steps of 8 rows of 128 tokens; accuracy on test
  c.lock()
  return c
