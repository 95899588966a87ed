"""The device mesh ('data', 'fsdp', 'tensor') and where each array lives on it.

Base weights carry logical axis names (llama.py); a short rules list from the
config maps them to mesh axes, e.g. `(('embed', 'fsdp'), ('mlp', 'tensor'))`.
A weight axis whose size the mesh axis does not divide (SmolLM2 has 9 query and
3 KV heads) is replicated on that axis instead, and `shardings_for` reports it.
The trainable partition and its optimizer state are small and replicated; the
batch is split over 'data' and 'fsdp' together (FSDP also splits the batch).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
Rules = Sequence[tuple[str, str | None]]


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
  """A mesh of `shape` (data, fsdp, tensor); -1 in one place takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape or (-1, 1, 1))
  if len(shape) != 3:
    raise ValueError(f'mesh shape must have 3 entries {AXES}, got {shape}')
  if shape.count(-1) > 1 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh shape {shape}: each entry is a positive size, or -1 (at most one) '
                     'for the remaining devices')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh shape {shape} does not divide the {len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh shape {tuple(shape)} needs {math.prod(shape)} devices, '
                     f'there are {len(devices)}')
  # Auto axes: shardings follow the rules and XLA's propagation (the default, Explicit, would
  # make every sharding part of the types)
  return jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def shardings_for(boxed_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (abstract) arrays.

  Returns (shardings, fallback) where `fallback` lists the (path, axis, size, mesh axis) of
  each rule that could not be followed because the mesh axis does not divide the size.
  """
  # box by box: a weight in blocks (model/quant.py) is a tree of boxes, its codes' and scales'
  def boxes(fn):
    return jax.tree.map(fn, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  specs = nn.logical_to_mesh(boxes(lambda box: box.get_partition_spec()), rules)
  shapes = boxes(lambda box: box.value)
  fallback = []

  def fit(path, spec, leaf):
    axes = []
    for dim, (size, axis) in enumerate(zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim)):
      names = (axis,) if isinstance(axis, str) else tuple(axis or ())
      ways = math.prod(mesh.shape[a] for a in names)
      if names and size % ways:
        fallback.append((jax.tree_util.keystr(path), dim, size, axis))
        axis = None
      axes.append(axis)
    return NamedSharding(mesh, PartitionSpec(*axes))

  shardings = jax.tree_util.tree_map_with_path(
      fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return shardings, fallback


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over data × fsdp; sequence and features whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows joined with the other processes' into one batch split over the mesh."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, rows)
          for name, rows in local_batch.items()}
