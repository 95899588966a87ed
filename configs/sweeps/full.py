r"""The `full` method comparison on SmolLM2-135M-Instruct: SST-2 and GSM8K, 3 seeds, for an
accelerator (about 480 runs; a GSM8K step takes ~20 s on 2 CPU cores).

    python -m experiments.sweep --config=configs/sweeps/full.py:search --root=gs://bucket/full_search
    python -m experiments.sweep --config=configs/sweeps/full.py --root=gs://bucket/full --shard=0/4
    python -m experiments.report gs://bucket/full --out=experiments/results/full

Methods: Pfeiffer and Houlsby adapters of dim 8 … 256, the parallel adapter (dim 64, scale
4), LoRA of rank 4 … 64 on all seven projections (alpha = 2·rank), (IA)³, prompt tuning,
prefix tuning and ladder side tuning; seeds 0, 1, 2; each task its own config:

  SST-2   configs/sst2.py: accuracy on the 872-row test split, the checkpoint chosen by
          accuracy on a fixed 500-row subset of dev
  GSM8K   configs/gsm8k.py: exact match on the 1,319-question test split, the checkpoint
          chosen by exact match on a fixed 200-question subset of a dev split held out from
          the end of train (5%: 374 questions), so that the test split chooses nothing

`:search` runs each method's learning-rate grid (small.py's, a factor of 3 apart) at its
middle size and seed 0 on both tasks, scored on dev alone; fill `LEARNING_RATES` with the
best per (task, method) before the study.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import small  # noqa: E402  (the searched grids and each method's config key)

BASE = 'configs/sst2.py'
TASKS = {
    'sst2': ('configs/sst2.py', {'config.eval_metric': 'accuracy',
                                 'config.eval_metric_limit': 500}),
    'gsm8k': ('configs/gsm8k.py', {'config.data.source.held_out.split': 'dev',
                                   'config.data.source.held_out.fraction': 0.05,
                                   'config.data.eval_split': 'dev',
                                   'config.eval_metric': 'exact_match',
                                   'config.eval_metric_limit': 200}),
}
DIMS = (8, 16, 32, 64, 128, 256)
RANKS = (4, 8, 16, 32, 64)
SIZES = {'pfeiffer': [{'dim': d} for d in DIMS], 'houlsby': [{'dim': d} for d in DIMS],
         'parallel': [{}], 'lora': [{'rank': r, 'alpha': 2 * r} for r in RANKS],
         'ia3': [{}], 'prompt': [{}], 'prefix': [{}], 'ladder': [{}]}
KEYS = {**{preset: key for preset, (key, _) in small.SEARCHED_AT.items()},
        'parallel': 'bottleneck'}
SEARCH = {**small.SEARCH, 'parallel': small.SEARCH['pfeiffer']}
SEEDS = (0, 1, 2)
# (task, method preset) -> the learning rate the search chose
LEARNING_RATES = {}


def points_of(h, task: str, preset: str, sizes, rates) -> list[dict]:
  base, settings = TASKS[task]
  key = KEYS[preset]
  fields = lambda size: [h.fixed(f'config.peft.{key}.{name}', value)
                         for name, value in size.items()]
  return h.product([h.fixed('base', base), h.fixed('arg', preset),
                    *[h.fixed(k, v) for k, v in settings.items()],
                    h.chain([h.product(fields(size)) for size in sizes]),
                    h.sweep(f'config.peft.{key}.optimizer.learning_rate', rates)])


def get_hyper(h, arg=None):
  if arg == 'search':
    return h.product([
        h.chain([points_of(h, task, preset, [sizes[len(sizes) // 2]], SEARCH[preset])
                 for task in TASKS for preset, sizes in SIZES.items()]),
        h.fixed('config.test_metric', ''), h.fixed('config.eval_every', 0),
        h.fixed('config.seed', 0)])
  if arg is not None:
    raise ValueError(f"configs/sweeps/full.py takes 'search' or nothing, got {arg!r}")
  missing = [(t, p) for t in TASKS for p in SIZES if (t, p) not in LEARNING_RATES]
  if missing:
    raise ValueError(f'no learning rate chosen for {missing}: run the :search sweep and fill '
                     'LEARNING_RATES')
  return h.product([
      h.chain([points_of(h, task, preset, sizes, [LEARNING_RATES[task, preset]])
               for task in TASKS for preset, sizes in SIZES.items()]),
      h.fixed('config.keep_best', 1), h.fixed('config.test_checkpoint', 'best'),
      h.sweep('config.seed', SEEDS)])
