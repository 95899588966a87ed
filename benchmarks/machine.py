"""The machine a benchmark ran on, for its JSON and its table's caption.

This machine kind comes on different CPUs (an Intel with AVX-512; AMD EPYC Zen 3 and Zen 4),
and the ratios between JAX and torch differ between them: every figure names its CPU (the
name, family and model /proc/cpuinfo gives, as `lscpu` shows them), whether it has
AVX-512, the cores this process may run on, and the versions of the libraries compared.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu() -> dict:
  """{model_name, family, model, avx512, cores}; platform.processor() is only 'x86_64'."""
  fields = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return {'model_name': fields.get('model name', platform.machine()),
          'family': fields.get('cpu family'), 'model': fields.get('model'),
          'avx512': 'avx512f' in fields.get('flags', '').split(),
          'cores': len(os.sched_getaffinity(0))}


def versions() -> dict:
  """The installed versions of what the benchmarks compare (None: not installed)."""
  found = {}
  for name in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'peft', 'numpy'):
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def describe() -> dict:
  return {**cpu(), 'versions': versions(), 'load_average': os.getloadavg()}


def caption(machine: dict) -> str:
  """'AMD EPYC (family 25, model 1, no AVX-512), 2 cores; jax 0.10.2, torch 2.13.0, …'"""
  libraries = ', '.join(f'{k} {v}' for k, v in machine['versions'].items() if v)
  avx = 'AVX-512' if machine['avx512'] else 'no AVX-512'
  return (f'{machine["model_name"]} (family {machine["family"]}, model {machine["model"]}, '
          f'{avx}), {machine["cores"]} cores; {libraries}')
