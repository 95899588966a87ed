r"""Adapters that work together, on SST-2 and TREC: the results page's combining table.

    python -m experiments.sweep --config=configs/sweeps/combining.py
    python -m experiments.report runs/combining --out=experiments/results/combining \
        --pair=fusion_sst2,sst2 --pair=fusion_trec,trec --pair=mixed,sst2 ...

In order (a later point reads earlier points' runs under the sweep's root, `{root}`):
a Pfeiffer adapter trained on SST-2 (configs/sst2.py) and one on TREC (configs/trec.py);
one trained on the two mixed 1:1 (configs/mixed.py); AdapterFusion of the first two trained
for each task (configs/fusion.py); their average (configs/average.py); and each adapter
scored on the task it was not trained for (configs/average.py with one adapter: nothing
trains). Every point but the averages and the scorings trains 60 steps of 8 rows of 128
tokens, as the quickstart; the fusions are the slowest (both adapters and the fusion in every
layer): 97 minutes in all on 2 busy CPU cores (the SST-2 point 1,408 s; 438 s on idle ones).
"""

BASE = 'configs/sst2.py'
TASKS = ('sst2', 'trec')
OTHER = {'sst2': 'trec', 'trec': 'sst2'}


def get_hyper(h):
  def point(name, base, arg, **config):
    return h.product([h.fixed('name', name), h.fixed('base', f'configs/{base}.py'),
                      h.fixed('arg', arg),
                      *[h.fixed(f'config.{k}', v) for k, v in config.items()]])

  adapters = tuple(f'{{root}}/{task}/adapter' for task in TASKS)
  trained = [point(task, task, 'pfeiffer') for task in TASKS]
  trained += [point('mixed', 'mixed', 'pfeiffer')]
  fused = [point(f'fusion_{task}', 'fusion', task, **{'peft.fusion.adapters': adapters})
           for task in TASKS]
  averaged = [point(f'average_{task}', 'average', task,
                    start_from=tuple(f'{{root}}/{t}' for t in TASKS)) for task in TASKS]
  # each trained adapter on the task it was not trained (or fused) for
  crossed = [point(f'{task}_on_{OTHER[task]}', 'average', OTHER[task],
                   start_from=(f'{{root}}/{task}',)) for task in TASKS]
  crossed += [point('mixed_on_trec', 'average', 'trec', start_from=('{root}/mixed',))]
  crossed += [point(f'fusion_{task}_on_{OTHER[task]}', 'average', OTHER[task],
                    start_from=(f'{{root}}/fusion_{task}',)) for task in TASKS]
  return h.chain(trained + fused + averaged + crossed)
