"""Finding a method by its name, key or preset, and building it from text or from fields.

Where text names a method (our adapter file, the `count` command) it is its
constructor call, `"Bottleneck(dim=64, placement='houlsby')"`; an experiment
config holds one entry per method key with the method's fields
(`config.peft.bottleneck.dim`), made from a preset of the method's class.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, Mapping

from additive_jax.peft.base import Method, method_classes
from additive_jax.peft.combinations import COMBINATIONS


def class_for_key(key: str) -> type[Method]:
  """The method class whose subtree of variables['peft'] is `key`."""
  classes = {cls.key: cls for cls in method_classes().values()}
  if key not in classes:
    raise ValueError(f'no method has the key {key!r}; method keys: {", ".join(sorted(classes))}')
  return classes[key]


def presets() -> dict[str, tuple[type[Method], dict]]:
  """Preset name -> (its method class, the fields it sets), over every method class."""
  return {name: (cls, dict(fields)) for cls in method_classes().values()
          for name, fields in cls.presets.items()}


def combinations() -> dict[str, tuple[tuple[type[Method], dict], ...]]:
  """Combination name -> its methods' (class, fields), e.g. 'mam' (peft/combinations.py)."""
  return {name: tuple((cls, dict(fields)) for cls, fields in parts)
          for name, parts in COMBINATIONS.items()}


def field_types(cls: type[Method]) -> dict[str, tuple[Any, type]]:
  """Field name -> (default, the type a config entry holds it as) of a method class. A field
  that may be None holds its other type (a config entry needs one to be overridable)."""
  hints = typing.get_type_hints(cls)
  fields = {}
  for field in dataclasses.fields(cls):
    kind = hints[field.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
      kind = next(a for a in typing.get_args(kind) if a is not type(None))
    kind = typing.get_origin(kind) or kind
    default = None if field.default is dataclasses.MISSING else field.default
    fields[field.name] = (default, kind)
  return fields


def method_from_fields(key: str, fields: Mapping) -> Method:
  """The method of `key` built from an entry's fields (other entries, such as its
  `optimizer` block, are not fields and are left out)."""
  cls = class_for_key(key)
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{name: value for name, value in fields.items() if name in names})


def parse_method(text: str) -> Method:
  """`"Bottleneck(dim=64, placement='houlsby')"` -> the method; literals only, never eval."""
  classes = method_classes()
  try:
    call = ast.parse(text.strip(), mode='eval').body
  except SyntaxError as err:
    raise ValueError(f'cannot parse method {text!r}: {err.msg}') from None
  if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
    raise ValueError(f'method must be written as a constructor call like "IA3()", got {text!r}')
  if call.func.id not in classes:
    raise ValueError(f'unknown method {call.func.id!r}; known: {", ".join(sorted(classes))}')
  try:
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError:
    raise ValueError(f'method arguments must be literals in {text!r}') from None
  return classes[call.func.id](*args, **kwargs)
