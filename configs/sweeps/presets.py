r"""Every method preset once on SST-2 at its defaults: the README's first results table.

    python -m experiments.sweep --config=configs/sweeps/presets.py
    python -m experiments.report runs/presets --out=experiments/results/sst2_methods

Each point is the quickstart (configs/sst2.py) with one preset, its default learning rate
and seed 0: about 5 minutes a run on 2 CPU cores.
"""

BASE = 'configs/sst2.py'
PRESETS = ('pfeiffer', 'houlsby', 'parallel', 'ia3', 'lora', 'prompt', 'prefix', 'ladder',
           'compacter', 'compacterpp')


def get_hyper(h):
  return h.sweep('arg', PRESETS)
