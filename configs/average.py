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

from additive_jax.train.config import default_config

# the task's built-in source and its held-out split for the eval loss
TASKS = {'sst2': 'dev', 'trec': 'dev'}


def get_config(arg=None):
  words = [w for w in (arg or 'sst2').split(',') if w]
  tasks = [w for w in words if w in TASKS]
  unknown = [w for w in words if w not in TASKS and w != 'runlocal']
  if len(tasks) != 1 or unknown:
    raise ValueError(f'configs/average.py takes one task of {", ".join(TASKS)} (and runlocal), '
                     f'got {arg!r}')
  c = default_config()
  c.peft = ml_collections.ConfigDict()  # the adapters' methods (train/start_from.py)
  c.data.source.name = tasks[0]
  c.data.split, c.data.eval_split = 'train', TASKS[tasks[0]]
  c.batch_size, c.seq_len = 8, 128
  c.num_steps = 0
  c.test_metric, c.test_split, c.test_before = 'accuracy', 'test', False
  c.eval_batches = 4
  if 'runlocal' in words:
    c.batch_size, c.seq_len, c.eval_batches, c.test_limit = 2, 64, 1, 16
  c.lock()
  return c
