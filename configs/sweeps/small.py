r"""The `small` method comparison on SmolLM2-135M-Instruct and SST-2, sized for 2 CPU cores.

    python -m experiments.sweep --config=configs/sweeps/small.py:search   # 27 runs, ~1 h 45 min
    python -m experiments.sweep --config=configs/sweeps/small.py          # 20 runs, ~1 h 40 min
    python -m experiments.report runs/small --out=experiments/results/small

Every run is the quickstart's (configs/sst2.py: 60 steps of 8 packed rows × 128 tokens, a
cosine schedule with 10 warmup steps).

`:search` picks each method's learning rate: three values a factor of 3 apart around the
method's default (a fourth above them where the highest of three won), at seed 0, each run scored once at its end by accuracy on a fixed 500-row
subset of the dev split (no test split is read). The values chosen are `LEARNING_RATES`
below (experiments/results/small_search.md has the search's table); a method's larger and
smaller sizes use the rate searched at the size named in `SEARCHED_AT`.

The study: Pfeiffer and Houlsby adapters of dim 16 and 64, LoRA of rank 4 and 16 on all seven
projections (alpha = 2·rank), (IA)³, prompt tuning, prefix tuning (20 tokens each) and
ladder side tuning, 2 seeds each. The dev accuracy on the same 500 rows is scored at steps 30
and 60, the better checkpoint is tested (`test_checkpoint='best'`) on the 872-row test split,
and each test row's outcome is kept (test_hits.json) for paired comparisons. The test split
is also scored before training in the seed-0 runs (the zero-shot base, for the methods that
start as the identity).
"""

BASE = 'configs/sst2.py'

# method preset -> (its config key, the size fields it is searched at)
SEARCHED_AT = {
    'pfeiffer': ('bottleneck', {'dim': 64}),
    'houlsby': ('bottleneck', {'dim': 64}),
    'lora': ('lora', {'rank': 16, 'alpha': 32}),
    'ia3': ('ia3', {}),
    'prompt': ('prompt', {}),
    'prefix': ('prefix', {}),
    'ladder': ('ladder', {}),
}
# Three rates a factor of 3 apart, the default in the middle; where the best of the three was
# the highest, one more rate 3 times higher (all but Pfeiffer's: 60 steps favour large rates).
SEARCH = {'pfeiffer': (3e-4, 1e-3, 3e-3), 'houlsby': (3e-4, 1e-3, 3e-3, 1e-2),
          'lora': (1.5e-4, 5e-4, 1.5e-3, 4.5e-3), 'ia3': (1e-3, 3e-3, 1e-2, 3e-2),
          'prompt': (1e-2, 3e-2, 1e-1, 3e-1), 'prefix': (1.5e-3, 5e-3, 1.5e-2, 4.5e-2),
          'ladder': (1e-3, 3e-3, 1e-2, 3e-2)}
# The search's choice: the best dev accuracy of each method's grid
# (experiments/results/small_search.md). (IA)³'s is the highest rate tried, so its best may lie
# higher still; every other choice has a worse rate on both sides.
LEARNING_RATES = {'pfeiffer': 1e-3, 'houlsby': 3e-3, 'lora': 1.5e-3, 'ia3': 3e-2, 'prompt': 1e-1,
                  'prefix': 1.5e-2, 'ladder': 1e-2}
# method preset -> the sizes studied (each a dict of fields)
SIZES = {'pfeiffer': [{'dim': 16}, {'dim': 64}], 'houlsby': [{'dim': 16}, {'dim': 64}],
         'lora': [{'rank': 4, 'alpha': 8}, {'rank': 16, 'alpha': 32}],
         'ia3': [{}], 'prompt': [{}], 'prefix': [{}], 'ladder': [{}]}
SEEDS = (0, 1)
DEV_ROWS = 500


def method_points(h, preset: str, sizes: list[dict], rates) -> list[dict]:
  key = SEARCHED_AT[preset][0]
  fields = lambda size: [h.fixed(f'config.peft.{key}.{name}', value)
                         for name, value in size.items()]
  return h.product([h.fixed('arg', preset),
                    h.chain([h.product(fields(size)) for size in sizes]),
                    h.sweep(f'config.peft.{key}.optimizer.learning_rate', rates)])


def get_hyper(h, arg=None):
  dev = [h.fixed('config.eval_metric', 'accuracy'), h.fixed('config.eval_metric_limit', DEV_ROWS)]
  if arg == 'search':
    return h.product([
        h.chain([method_points(h, preset, [size], SEARCH[preset])
                 for preset, (_, size) in SEARCHED_AT.items()]),
        *dev, h.fixed('config.eval_every', 0), h.fixed('config.checkpoint_every', 60),
        h.fixed('config.test_metric', ''), h.fixed('config.seed', 0)])
  if arg is not None:
    raise ValueError(f"configs/sweeps/small.py takes 'search' or nothing, got {arg!r}")
  missing = [preset for preset in SIZES if preset not in LEARNING_RATES]
  if missing:
    raise ValueError(f'no learning rate chosen for {missing}: run the :search sweep and fill '
                     'LEARNING_RATES')
  return h.product([
      h.chain([method_points(h, preset, sizes, [LEARNING_RATES[preset]])
               for preset, sizes in SIZES.items()]),
      *dev, h.fixed('config.eval_every', 30), h.fixed('config.checkpoint_every', 30),
      h.fixed('config.keep_checkpoints', 1), h.fixed('config.keep_best', 1),
      h.fixed('config.test_checkpoint', 'best'),
      # the zero-shot score is the same for every seed: scored with seed 0's runs only
      h.zip([h.sweep('config.seed', SEEDS),
             h.sweep('config.test_before', [seed == SEEDS[0] for seed in SEEDS])])])
