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
from additive_jax.train.config import default_config, parse_arg, with_methods

PRIMARY = ('sst2', 'trec')


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, **dict.fromkeys(PRIMARY, False))
  named = [name for name in PRIMARY if args[name]]
  if len(named) > 1:
    raise ValueError(f'configs/mixed.py: name one primary source, got {", ".join(named)}')
  c = with_methods(default_config(), *(args['methods'] or ('pfeiffer',)))
  # the built-in declarations (additive_jax/data/builtins.py), one entry each
  c.data.mixture.sst2 = mixture_entry('sst2', weight=0.5)
  c.data.mixture.trec = mixture_entry('trec', weight=0.5)
  c.data.source.name = named[0] if named else 'sst2'  # evaluated and tested
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
