"""Frozen adapters a run loads (AdapterFusion's fused adapters): read from their sources, kept in
the run's folder.

    found = read_sources(config, workdir)        # before check_config: a bad source named first
    mesh, methods = check_config(config, workdir)
    methods = keep_copies(found, methods, config, workdir)   # the model reads the copies

A method lists the paths of the adapters it holds frozen (`Method.frozen_sources`): an
adapter file directory, ours or AdapterHub's (`peft/frozen.py`), or another run's folder,
whose latest checkpoint is read (`restore_run`, the default of every command). Each is
read before anything heavy, and its method is written into the method's config entry
(`Method.with_frozen`: for Fusion, `adapter_methods`), so the config alone gives every
frozen leaf's shape (`restore.abstract_train_state`). Each is then copied, in our adapter
format, to `<workdir>/frozen/<key>/<i>/` with its source's path (`source.json`), and the
model reads it there. The leaves themselves are part of `variables['peft']`, so every
checkpoint holds them: `generate`, `evaluate` and `export` need the workdir alone, also once
it has moved or the sources are deleted. A resumed run reads its copies, not the sources.
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath
import jax
from jax.experimental import multihost_utils

from additive_jax.model.load import load_config
from additive_jax.peft.files import save_adapter
from additive_jax.peft.files.aj_format import flat_leaves
from additive_jax.peft.files.complete import COMPLETE, check_complete, writing
from additive_jax.peft.files.file_io import AdapterFileError, check_shapes, write_json
from additive_jax.peft.frozen import load_frozen
from additive_jax.peft.param_count import leaf_shapes
from additive_jax.train.config_checks import methods_of
from additive_jax.train.restore import restore_run
from additive_jax.train.workdir import RunFolder

SOURCE = 'source.json'


@dataclasses.dataclass
class Source:
  path: str        # as the config lists it
  method: object
  tree: dict       # its leaves (host arrays)
  copied: bool     # read from the workdir's complete copy of this source


def read_source(path: str, model_config):
  """(method, tree) of a run folder (its latest checkpoint) or a one-method adapter file
  directory, checked against the base `model_config`."""
  if not (epath.Path(path) / 'checkpoints').is_dir():
    return load_frozen(path, model_config)
  run = restore_run(path)
  if len(run.methods) != 1:
    raise AdapterFileError(f'{path}: the run trained {", ".join(m.call_string() for m in run.methods)}'
                           '; a frozen adapter is one method')
  method, tree = run.methods[0], run.peft[run.methods[0].key]
  try:
    method.check(model_config)
  except ValueError as err:
    raise AdapterFileError(f'{path}: {err}') from None
  check_shapes(leaf_shapes((method,), model_config), flat_leaves((method,), {method.key: tree}),
               f'{path} (a run of {run.config["model"]})')
  return method, tree


def read_sources(config, workdir: str) -> dict[str, list[Source]]:
  """Each method's frozen sources read (a complete copy in the workdir instead, when it has one
  of the same source), their methods written into the config entries; by method key."""
  folder, found = RunFolder(workdir), {}
  for method in methods_of(config):
    if not method.frozen_sources():
      continue
    model_config = load_config(config.model)  # only then: a run without them reads nothing here
    key, entry = method.key, config.peft[method.key]
    sources = []
    for index, path in enumerate(method.frozen_sources()):
      copy = folder.frozen(key, index)
      copied = _copy_of(copy, path)
      try:
        sources.append(Source(path, *read_source(str(copy) if copied else path, model_config),
                              copied))
      except ValueError as err:
        raise ValueError(f'config.peft.{key}: {err}') from None
    resolved = method.with_frozen(method.frozen_sources(), tuple(s.method for s in sources))
    for field in dataclasses.fields(resolved):
      if getattr(resolved, field.name) != getattr(method, field.name):
        entry[field.name] = getattr(resolved, field.name)
    found[key] = sources
  return found


def keep_copies(found: dict[str, list[Source]], methods, config, workdir: str) -> tuple:
  """`methods` reading their frozen adapters from the copies in `workdir` (written here by
  process 0 where missing; every process waits for them)."""
  folder = RunFolder(workdir)
  missing = [(key, index, source) for key, sources in found.items()
             for index, source in enumerate(sources) if not source.copied]
  if missing and jax.process_index() == 0:
    model_config = load_config(config.model)
    for key, index, source in missing:
      with writing(str(folder.frozen(key, index))) as out:
        save_adapter(str(out), (source.method,), {source.method.key: source.tree}, model_config,
                     format='aj', base_model_name_or_path=config.model)
        write_json(str(out / SOURCE), {'source': source.path})
  if missing and jax.process_count() > 1:
    multihost_utils.sync_global_devices('frozen adapter copies')
  return tuple(
      m.with_frozen(tuple(str(folder.frozen(m.key, i)) for i in range(len(found[m.key]))),
                    tuple(s.method for s in found[m.key])) if m.key in found else m
      for m in methods)


def _copy_of(copy: epath.Path, source: str) -> bool:
  """Whether `copy` is a complete copy of `source` (our own write of it, marked complete)."""
  try:
    if not (copy / COMPLETE).exists():
      return False
    check_complete(str(copy))
    recorded = json.loads((copy / SOURCE).read_text(encoding='utf-8'))['source']
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return recorded == source
