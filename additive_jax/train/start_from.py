"""A run that starts from trained adapters instead of its methods' init: `config.start_from`.

    --config.start_from="('runs/sst2/adapter', 'runs/trec')" --config.start_weights="(0.5, 0.5)"

Each entry is an adapter file (any format `aj.peft.load_adapter` reads) or a run folder
(its latest checkpoint). The run's trainables start as their weighted average
(`aj.peft.average`: Σ w_i θ_i, leaf by leaf, the weights divided by their sum, equal by
default, as AdapterHub's `average_adapter`), so one entry continues training an adapter and several start from an
AdapterSoup-style average. The adapters must share one method set; `config.peft` either
names that set (then it must match it) or is left empty, and the adapters' methods fill it
(each with its class's optimizer settings), so the run's saved config names what it trains
and it restores, resumes and exports as any run.

With `config.num_steps=0` nothing trains: the run scores the (averaged) adapters on its
own task and keeps them as its checkpoint and adapter, which is how an adapter trained on
one task is scored on another (configs/average.py).
"""

from __future__ import annotations

import dataclasses

from etils import epath
import jax
import ml_collections

from additive_jax.model.load import load_config
from additive_jax.peft.average import average
from additive_jax.peft.files import load_adapter
from additive_jax.train.config import entries_of
from additive_jax.train.config_checks import methods_of
from additive_jax.train.restore import restore_run
from additive_jax.train.workdir import RunFolder


@dataclasses.dataclass
class Start:
  methods: tuple
  peft: dict        # {key: leaves}, the weighted average of the adapters'
  sources: tuple    # each adapter's path, as configured


def check_start_keys(config) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
  """(paths, weights or None) of `config.start_from` / `config.start_weights`, checked: a
  mistake named by its key before anything is read."""
  paths, weights = tuple(config.start_from or ()), tuple(config.start_weights or ())
  if any(not isinstance(p, str) or not p for p in paths):
    raise ValueError(f'config.start_from must be a tuple of adapter files or run folders, got '
                     f'{config.start_from!r}')
  if weights:
    if len(weights) != len(paths):
      raise ValueError(f'config.start_weights has {len(weights)} weights for '
                       f'{len(paths)} adapters in config.start_from')
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
      raise ValueError(f'config.start_weights must be numbers, got {config.start_weights!r}')
  if config.num_steps == 0 and not paths:
    raise ValueError('config.num_steps=0 trains nothing; it scores the adapters of '
                     'config.start_from, and that is empty')
  return paths, (weights or None)


def load_start(config: ml_collections.ConfigDict) -> Start | None:
  """The adapters of `config.start_from`, averaged; `config.peft` filled from them when it is
  empty, else checked against them. None when the run starts from its methods' init."""
  paths, weights = check_start_keys(config)
  if not paths:
    return None
  base = load_config(config.model)
  adapters = [_adapter(path, base) for path in paths]
  methods = adapters[0][0]
  for path, (others, _) in zip(paths[1:], adapters[1:]):
    if others != methods:
      raise ValueError(f'config.start_from: {path} holds {_calls(others)}, {paths[0]} holds '
                       f'{_calls(methods)}; averaged adapters share one method set')
  if config.peft:
    configured = methods_of(config)
    if configured != methods:
      raise ValueError(f'config.start_from holds {_calls(methods)}, config.peft names '
                       f'{_calls(configured)}: leave config.peft empty to train what the '
                       'adapters are, or name the same methods')
  else:
    with config.unlocked():
      config.peft = entries_of(methods)
  _, peft = average(adapters, weights) if len(adapters) > 1 else adapters[0]
  # on the host: the jitted init places them where the train state lives (every device)
  return Start(methods, jax.device_get(peft), paths)


def _adapter(path: str, base) -> tuple[tuple, dict]:
  """(methods, peft) of an adapter file, or of a run folder's latest checkpoint."""
  if RunFolder(path).checkpoints.exists():
    run = restore_run(path, 'latest')
    return tuple(run.methods), run.peft
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'config.start_from: no adapter file or run folder {path}')
  return load_adapter(path, base)


def _calls(methods) -> str:
  return ', '.join(m.call_string() for m in methods)
