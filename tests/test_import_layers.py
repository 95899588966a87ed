"""Imports flow one way: config → data → model → peft → eval → train → commands.

Read from every module's source (AST), not by importing it: each `additive_jax`
import names a module of its own layer or an earlier one, no import of the
project hides inside a function (the package's PEP 562 `__getattr__` is the
one lazy import, and it uses importlib), and the two config modules import
nothing of the project.
"""

import ast
import collections
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'additive_jax')

# Layer of a module: the longest of these prefixes it starts with.
LAYERS = {'additive_jax.model.config': 0, 'additive_jax.data.config': 0,
          'additive_jax.data': 1, 'additive_jax.model': 2, 'additive_jax.peft': 3,
          'additive_jax.eval': 4, 'additive_jax.train': 5, 'additive_jax': 6}
LAYER_NAMES = ('config', 'data', 'model', 'peft', 'eval', 'train', 'commands')


def layer(module: str) -> int:
  prefix = max((p for p in LAYERS if module == p or module.startswith(p + '.')), key=len)
  return LAYERS[prefix]


def modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        yield '.'.join(parts), path


def project_imports(path: str):
  """(imported module, line, at the top level) of every `additive_jax` import in the file."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  top = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from additive_jax.data import packing` imports the module additive_jax.data.packing
      names = [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    for name in names:
      if name.split('.')[0] == 'additive_jax':
        yield name, node.lineno, id(node) in top


def test_the_layer_table_covers_the_package():
  assert len(dict(modules())) > 40
  assert {layer(m) for m, _ in modules()} == set(range(len(LAYER_NAMES)))


@pytest.mark.parametrize('module, path', sorted(modules()), ids=lambda x: x if '.' in x else '')
def test_a_module_imports_only_its_own_or_an_earlier_layer(module, path):
  known = dict(modules())
  for name, line, at_top in project_imports(path):
    # an imported name that is not a module (a function, a class) belongs to its module
    target = name if name in known else name.rsplit('.', 1)[0]
    assert layer(target) <= layer(module), (
        f'{path}:{line}: {module} ({LAYER_NAMES[layer(module)]}) imports {name} '
        f'({LAYER_NAMES[layer(target)]}), a later layer')
    assert at_top, f'{path}:{line}: {module} imports {name} inside a function'
    if layer(module) == 0:
      raise AssertionError(f'{path}:{line}: the config module {module} imports {name}')


def test_no_two_modules_share_a_file_name():
  """One name, one thing: a reader who looks for `decode` or `metrics_log` finds one file (each
  layer's config.py and the packages' __init__.py aside)."""
  names = collections.Counter(os.path.basename(path) for _, path in modules())
  assert not {name for name, n in names.items() if n > 1} - {'__init__.py', 'config.py'}, names
