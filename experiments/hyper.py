"""The sweep algebra of a sweep file's `get_hyper(hyper)`, in big_vision's manner.

    def get_hyper(h):
      return h.product([
          h.chain([h.fixed('arg', 'ia3'),
                   h.zip([h.sweep('arg', ['lora', 'lora']),
                          h.sweep('config.peft.lora.rank', [4, 16]),
                          h.sweep('config.peft.lora.alpha', [8, 32])])]),
          h.sweep('config.seed', [0, 1]),
      ])

A point is a dict: `arg` is the base config's argument (a method preset, or several joined
by ','), `base` another experiment config than the sweep file's `BASE`, `name` its workdir's
name when the one made from its values would not read well, and each `config.<key>` a value
given to the run on the command line as `--config.<key>=<value>`, where `{root}` stands for
the sweep's root (a point that reads an earlier point's run: `'{root}/sst2/adapter'`).
Every function returns a list of points.
"""

from __future__ import annotations

import builtins
import itertools

POINT_KEYS = ('arg', 'base', 'name')  # a point's keys besides its `config.<key>` values


def sweep(key: str, values) -> list[dict]:
  """One point per value of `key`."""
  _check_key(key)
  return [{key: value} for value in values]


def fixed(key: str, value) -> list[dict]:
  """One point: `key` set to `value`."""
  return sweep(key, [value])


def product(sweeps: list[list[dict]]) -> list[dict]:
  """Every combination, one point from each sweep (the last varying fastest)."""
  return [_merge(combination) for combination in itertools.product(*sweeps)]


def zip(sweeps: list[list[dict]]) -> list[dict]:  # pylint: disable=redefined-builtin
  """The i-th points of the sweeps together; the sweeps must have one length."""
  lengths = sorted({len(s) for s in sweeps})
  if len(lengths) > 1:
    raise ValueError(f'hyper.zip of sweeps of lengths {lengths}: they must have one length')
  return [_merge(points) for points in builtins.zip(*sweeps)]


def chain(sweeps: list[list[dict]]) -> list[dict]:
  """The points of each sweep, one after the other."""
  return [point for points in sweeps for point in points]


def _check_key(key: str) -> None:
  if key not in POINT_KEYS and not key.startswith('config.'):
    raise ValueError(f"a sweep key is 'arg', 'base', 'name' or 'config.<key>', got {key!r}")


def _merge(points) -> dict:
  merged = {}
  for point in points:
    for key, value in point.items():
      if key in merged and merged[key] != value:
        raise ValueError(f'{key!r} is set twice in one point ({merged[key]!r} and {value!r})')
      merged[key] = value
  return merged
