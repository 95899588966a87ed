r"""Pfeiffer and LoRA over a base in blocks: the benchmarks page's accuracy per `base_quant`.

    python -m experiments.sweep --config=configs/sweeps/quant.py
    python -m experiments.report runs/quant --out=experiments/results/quant \
        --pair=int8_pfeiffer,none_pfeiffer --pair=int4_pfeiffer,none_pfeiffer ... (each against none)

Each point is the quickstart (configs/sst2.py: 60 steps of 8 rows of 128 tokens, seed 0) with
the preset over `base_quant`; the base's own accuracy over its blocks is scored before the
Pfeiffer runs train. The embedded SmolLM2 is a Q4_1 file: `none` widens its 4-bit values, and
int8, int4 and nf4 round those values onto a grid of their own (`gguf` keeps the file's blocks:
the logits of `none` bit for bit, so it has no point here). An argument runs some points,
e.g. `:int4_lora,nf4_lora`.
"""

BASE = 'configs/sst2.py'
POINTS = {f'{quant}_{method}': (quant, method) for quant in ('none', 'int8', 'int4', 'nf4')
          for method in ('pfeiffer', 'lora')}


def get_hyper(h, arg=None):
  names = tuple(arg.split(',')) if arg else tuple(POINTS)
  unknown = [name for name in names if name not in POINTS]
  if unknown:
    raise ValueError(f'quant.py: unknown point {unknown}; the points: {", ".join(POINTS)}')
  return h.chain([h.product([h.fixed('name', name), h.fixed('arg', POINTS[name][1]),
                             h.fixed('config.base_quant', POINTS[name][0]),
                             h.fixed('config.test_before', POINTS[name][1] == 'pfeiffer')])
                  for name in names])
