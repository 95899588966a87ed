"""One adapter file from several: AdapterHub's average or one of HF PEFT's LoRA merges.

    python -m additive_jax.combine --adapter=out/a --adapter=out/b --weights=0.7,0.3 \\
        --how=average --out=out/ab [--format=aj|hf_peft|adapterhub] [--model=BASE]
    python -m additive_jax.combine --adapter=runs/x --adapter=out/lora --how=ties --density=0.5 \\
        --out=out/merged --format=hf_peft

`--adapter` (repeated) is a folder of adapter files in any format `load_adapter` reads,
or a run's workdir (its latest checkpoint's trainables, `train.restore.restore_run`).
`--how`:
  average                     every leaf Σ w_i θ_i, any method set (`aj.peft.average`,
                              AdapterHub's `average_adapter`); `--normalize` (default) divides
                              the weights by their sum, as AdapterHub does
  lora_linear_only_negate_b, lora_delta_w_svd   AdapterHub's other LoRA averages
                              (`--rank`: lora_delta_w_svd's svd_rank)
  linear, svd, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd,
  magnitude_prune, magnitude_prune_svd   HF PEFT's `add_weighted_adapter` on LoRA adapters
                              (`aj.peft.merge_lora`): `--density`, `--rank`,
                              `--majority_sign_method`, `--svd_clamp`; `--seed` draws DARE's masks
`--weights` default to 1/n each. The base is `--model`, else the base the adapters
record (`base_model_name_or_path` in ours and PEFT's files, `model_name` in AdapterHub's,
a run's `config.model`), which must be one; it is read for its config only, no weight.
The result is written to `--out` in `--format`, first into a scratch folder (a format
that cannot hold the result is refused before `--out` is touched), then whole or not at
all (`peft/files/complete.py`). Bad input is one `error: …` line.
"""

from additive_jax import command  # first: it quiets what later imports print
import sys
import tempfile

from absl import app, flags
from etils import epath
import jax

from additive_jax.model.load import load_config
from additive_jax.peft.average import STRATEGIES, average
from additive_jax.peft.files import FORMATS, detect_format, load_adapter, save_adapter
from additive_jax.peft.files.aj_format import CONFIG_NAME as AJ_CONFIG
from additive_jax.peft.files.complete import writing
from additive_jax.peft.files.file_io import read_json
from additive_jax.peft.files.hf_peft import CONFIG_NAME as SHARED_CONFIG
from additive_jax.peft.lora_merges import DARE, HOWS, PRUNING, merge_lora
from additive_jax.train.restore import restore_run

AVERAGES = {'average': 'linear', **{s: s for s in STRATEGIES if s != 'linear'}}
CHOICES = tuple(AVERAGES) + HOWS



def is_run(path: str) -> bool:
  return (epath.Path(path) / 'checkpoints').is_dir()


def recorded_base(path: str) -> str | None:
  """The base an adapter folder or a run names, or None."""
  if is_run(path):
    return restore_run(path, 'latest', trainables=False).config['model']
  format = detect_format(path)
  if format == 'aj':
    return read_json(str(epath.Path(path) / AJ_CONFIG)).get('base_model_name_or_path') or None
  settings = read_json(str(epath.Path(path) / SHARED_CONFIG))
  return settings.get('base_model_name_or_path' if format == 'hf_peft' else 'model_name') or None


def base_of(paths: list[str], model: str | None) -> str:
  if model:
    return model
  bases = {path: recorded_base(path) for path in paths}
  if None in bases.values():
    path = next(p for p, base in bases.items() if base is None)
    raise ValueError(f'--adapter={path} records no base model; name it with --model')
  if len(set(bases.values())) > 1:
    listed = ', '.join(f'{p}: {b}' for p, b in bases.items())
    raise ValueError(f'the adapters record different base models ({listed}); name the one to '
                     'combine them for with --model')
  return next(iter(bases.values()))


def combined(adapters, how: str, weights, normalize=True, density=None, rank=None,
             majority_sign_method='total', svd_clamp=None, seed=0):
  """(methods, peft) of `adapters` combined by `how` (one of CHOICES)."""
  if how in AVERAGES:
    unused = [name for name, value in (('--density', density), ('--svd_clamp', svd_clamp))
              if value is not None]
    if unused:
      raise ValueError(f'{unused[0]} is for the LoRA merges ({", ".join(PRUNING)} or the _svd '
                       f'ones), not --how={how}')
    if rank is not None and how != 'lora_delta_w_svd':
      raise ValueError(f'--rank is for --how=lora_delta_w_svd and the _svd merges, not --how={how}')
    return average(adapters, weights, normalize_weights=normalize,
                   combine_strategy=AVERAGES[how], svd_rank=rank)
  weights = weights if weights is not None else [1.0 / len(adapters)] * len(adapters)
  return merge_lora(adapters, weights, how, density=density, rank=rank,
                    majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                    rng=jax.random.key(seed) if how in DARE else None)


def combine(paths: list[str], out: str, how: str = 'average', weights=None, format: str = 'aj',
            model: str | None = None, **options) -> str:
  """Writes `paths` (adapter folders or runs) combined by `how` to `out` in `format`; returns
  `out`. `options`: `combined`'s."""
  if not paths:
    raise ValueError('give the adapters to combine: --adapter=PATH, repeated')
  if how not in CHOICES:
    raise ValueError(f'--how must be one of {", ".join(CHOICES)}, got {how!r}')
  if weights is not None and len(weights) != len(paths):
    raise ValueError(f'--weights has {len(weights)} values for {len(paths)} adapters')
  if epath.Path(out).is_file():
    raise ValueError(f'--out={out} is a file; give a directory')
  base = base_of(paths, model)
  config = load_config(base)
  adapters = []
  for path in paths:
    if is_run(path):
      run = restore_run(path, 'latest')
      adapters.append((run.methods, run.peft))
    else:
      adapters.append(load_adapter(path, config))
  methods, peft = combined(adapters, how, weights, **options)
  with tempfile.TemporaryDirectory() as scratch:  # a refusal before --out is touched
    save_adapter(scratch, methods, peft, config, format=format, base_model_name_or_path=base)
  with writing(out) as folder:
    save_adapter(str(folder), methods, peft, config, format=format, base_model_name_or_path=base)
  return out


def parse_weights(values) -> list[float] | None:
  if values is None:
    return None
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ValueError(f'--weights={",".join(values)}: each weight must be a number') from None


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command: a process that imports this
  module beside `export` (which owns --out, --format and --model too) must not clash."""
  flags.DEFINE_multi_string('adapter', [], 'a folder of adapter files or a run; repeated')
  flags.DEFINE_list('weights', None, 'one weight per adapter (default: 1/n each)')
  flags.DEFINE_enum('how', 'average', CHOICES, 'how the adapters are combined')
  flags.DEFINE_bool('normalize', True, 'averages: divide the weights by their sum')
  flags.DEFINE_float('density', None, 'ties, dare_*, magnitude_prune*: the fraction kept')
  flags.DEFINE_integer('rank', None, "_svd merges, lora_delta_w_svd: the result's rank")
  flags.DEFINE_enum('majority_sign_method', 'total', ('total', 'frequency'),
                    "ties, dare_ties: TIES' sign election")
  flags.DEFINE_float('svd_clamp', None, '_svd merges: the quantile to clamp to')
  flags.DEFINE_integer('seed', 0, "dare_*: the seed of the masks")
  flags.DEFINE_string('out', None, 'the folder written', required=True)
  flags.DEFINE_enum('format', 'aj', FORMATS, 'the adapter format written')
  flags.DEFINE_string('model', None, 'the base (default: the one the adapters record)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  try:
    out = combine(f.adapter, f.out, f.how, parse_weights(f.weights), f.format, f.model,
                  normalize=f.normalize, density=f.density, rank=f.rank,
                  majority_sign_method=f.majority_sign_method, svd_clamp=f.svd_clamp, seed=f.seed)
  except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
    sys.exit(f'error: {err}')
  print(f'wrote {out}')


if __name__ == '__main__':
  define_flags()
  command.run(main)
