r"""Trained adapters averaged, or one adapter alone, scored on a task: nothing trains.

    .venv/bin/python -m additive_jax.main --config=configs/average.py:trec --workdir=/tmp/soup_trec \
        --config.start_from="('/tmp/sst2_pfeiffer', '/tmp/trec_pfeiffer')"
    .venv/bin/python -m additive_jax.main --config=configs/average.py:trec --workdir=/tmp/sst2_on_trec \
        --config.start_from="('/tmp/sst2_pfeiffer',)"

`config.start_from` names adapter files or run folders of one method set; the run's
trainables are their weighted average (`aj.peft.average`, equal weights unless
`config.start_weights` says; AdapterHub's `average_adapter`, the AdapterSoup line of
work), its methods theirs (config.peft is left empty), and with `num_steps=0` it scores
that adapter on the argument's task (sst2 or trec; `runlocal` shrinks the scoring) and keeps
it as the run's checkpoint and `adapter/`. One adapter alone is how an adapter trained on
one task is scored on another.
"""

import ml_collections

from additive_jax.train.config import default_config, task_arg, task_run


def get_config(arg=None):
  args = task_arg(arg, 'configs/average.py', methods=False)
  c = task_run(default_config(), args['task'], args['runlocal'])  # its scoring settings
  c.peft = ml_collections.ConfigDict()  # the adapters' methods (train/start_from.py)
  c.num_steps, c.test_before = 0, False
  c.lock()
  return c
