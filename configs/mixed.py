r"""SmolLM2-135M-Instruct on SST-2 and TREC mixed 1:1: one method (default Pfeiffer), accuracy
of the primary source before and after.

    .venv/bin/python -m additive_jax.main --config=configs/mixed.py --workdir=/tmp/mixed
    .venv/bin/python -m additive_jax.main --config=configs/mixed.py:lora,trec \
      --workdir=/tmp/mixed_trec
    .venv/bin/python -m additive_jax.main --config=configs/mixed.py --workdir=/tmp/mixed_1to3 \
      --config.data.mixture.trec.weight=1.5

The argument names method presets as in configs/sst2.py, `runlocal` shrinks the run to a
smoke test, and `sst2` (the default) or `trec` names the primary source: the one whose dev
split gives the eval loss and whose test split the accuracy (`config.data.source`). Both
train either way: examples of the two are mixed by weight (0.5 each; the weights are
relative) before packing, so a packed row of 128 tokens may hold both, each with its own
prompt and label words. The run matches configs/sst2.py's and configs/trec.py's (60 steps
of 8 packed rows of 128 tokens).
"""

from additive_jax.data.config import mixture_entry
from additive_jax.train.config import default_config, task_arg, task_run, with_methods


def get_config(arg=None):
  args = task_arg(arg, 'configs/mixed.py')
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  # the built-in declarations (additive_jax/data/builtins.py), one entry each
  c.data.mixture.sst2 = mixture_entry('sst2', weight=0.5)
  c.data.mixture.trec = mixture_entry('trec', weight=0.5)
  task_run(c, args['task'], args['runlocal'])  # the primary source: evaluated and tested
  c.lock()
  return c
