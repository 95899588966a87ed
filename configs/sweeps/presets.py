r"""Every method preset once on SST-2 at its defaults: the README's first results table.

    python -m experiments.sweep --config=configs/sweeps/presets.py
    python -m experiments.report runs/presets --out=experiments/results/sst2_methods

Each point is the quickstart (configs/sst2.py) with one preset, its default learning rate
and seed 0: about 5 minutes a run on 2 CPU cores. An argument runs some of them, e.g. the
methods added after the others were run:

    python -m experiments.sweep --config=configs/sweeps/presets.py:compacter,compacterpp,loreft,direft \
        --root=runs/presets_added
"""

BASE = 'configs/sst2.py'
PRESETS = ('pfeiffer', 'houlsby', 'parallel', 'ia3', 'lora', 'prompt', 'prefix', 'ladder',
           'compacter', 'compacterpp', 'loreft', 'direft', 'ptuning', 'adaption_prompt', 'mam',
           'unipelt')


def get_hyper(h, arg=None):
  names = tuple(arg.split(',')) if arg else PRESETS
  unknown = [name for name in names if name not in PRESETS]
  if unknown:
    raise ValueError(f'presets.py: unknown preset {unknown}; the presets: {", ".join(PRESETS)}')
  return h.sweep('arg', names)
