"""What every command does the same way: a quiet start and one-line errors for bad flags.

Every command imports this module first, and `run(main)` stands in for
`absl.app.run(main)`. Importing it, before JAX or transformers is imported,
silences what reads like an error and is not (transformers' "PyTorch was not
found", which a user's install without torch prints at its import; TensorFlow's
and JAX's probe for a TPU). `run` keeps Orbax's INFO lines out of the log (its
warnings stay) and parses the flags so that a bad `--config.<key>` override is
one line naming the key and the nearest valid one, instead of a traceback.
What a user is meant to read is printed; the log carries warnings and errors
(and INFO lines with `--verbosity=0`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

QUIET_ENVIRONMENT = {
    'TRANSFORMERS_NO_ADVISORY_WARNINGS': '1',  # "PyTorch was not found..." without torch
    'TRANSFORMERS_VERBOSITY': 'error',
    'TF_CPP_MIN_LOG_LEVEL': '2',               # tensorflow_datasets' TensorFlow, if installed
}


for _name, _value in QUIET_ENVIRONMENT.items():
  os.environ.setdefault(_name, _value)


def _keep_record(record: logging.LogRecord) -> bool:
  """Drops lines that bury the run's own or read like an error and are not: Orbax logs every
  stage of every save at INFO and warns that a checkpoint opened read-only (as export and
  generate open a run's) is read-only; JAX reports each backend it probes and does not find
  (libtpu on a CPU)."""
  orbax = f'{os.sep}orbax{os.sep}' in record.pathname
  if record.levelno >= logging.WARNING:
    return not (orbax and record.getMessage().startswith('Given directory is read only'))
  return not orbax and not record.getMessage().startswith('Unable to initialize backend')


def _config_keys(config) -> list[str]:
  keys = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      keys += [f'{key}.{sub}' for sub in _config_keys(value)]
    keys.append(key)
  return keys


def _load_config_file(argv: list[str]):
  """The config that `--config=FILE[:ARG]` names, before any override; None if there is none."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_experiment_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def override_problem(argv: list[str], error: Exception) -> str:
  """One line for a failed flag parse: the first `--config.<key>` the config has not (with its
  nearest valid key), else the error itself."""
  try:
    config = _load_config_file(argv)
  except Exception as err:  # the config file itself is broken: say so
    return f'--config: cannot load the config file ({type(err).__name__}: {err})'
  keys = _config_keys(config) if config is not None else []
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      parts = key.split('.')
      if config is not None and parts[0] == 'peft' and len(parts) > 1 and parts[1] not in config.peft:
        return (f'--config.{key}: this run does not train {parts[1]!r} (config.peft has '
                f'{", ".join(config.peft)}); name its preset in the config argument, e.g. '
                f'--config=FILE:{parts[1]}')
      if keys and key not in keys:
        nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
        return (f'--config.{key}: the config has no key {key!r}' +
                (f'; the nearest is config.{nearest[0]}' if nearest else ''))
  if isinstance(error, RecursionError):  # raised from ast.literal_eval, naming no flag
    deep = next((a for a in argv if a.startswith('--config.') and _nests_too_deeply(a)), None)
    if deep is not None:
      return f'{deep.split("=", 1)[0]}: the value nests too deeply to parse ({error})'
  return str(error)


def _nests_too_deeply(arg: str) -> bool:
  """Whether the value of `--config.<key>=<value>` is a literal nested past the recursion limit."""
  try:
    ast.literal_eval(arg.partition('=')[2])
  except RecursionError:
    return True
  except Exception:  # not a literal, or not too deep: some other flag's problem
    return False
  return False


def parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
    if not flags.FLAGS['verbosity'].present:  # INFO lines (TFDS's, ours) with --verbosity=0
      absl_logging.set_verbosity(absl_logging.WARNING)
    return rest
  # config_flags lets a missing key's KeyError or AttributeError through, unwrapped, and
  # ast.literal_eval's SyntaxError or RecursionError for a literal like '(((...' or '----1'
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, SyntaxError,
          RecursionError) as err:
    # one line, whatever the key or value held (a newline, a record separator)
    sys.exit('error: ' + ' '.join(override_problem(argv, err).split()))


def run(main) -> None:
  absl_logging.get_absl_handler().addFilter(_keep_record)
  app.run(main, flags_parser=parse_flags)
