"""Fuzzed command lines: `--config.<key>=<value>` overrides of random keys and values, parsed by
additive_jax/command.py as every command parses them.

The property: the flags parse, or the command exits with its one-line error (`SystemExit`
whose message is `error: ...` on a single line); a traceback (a RecursionError from a deeply
nested literal, a SyntaxError) is a bug. The config file is configs/sst2.py, with main.py's two
flags (`--config`, locked, and the required `--workdir`) defined afresh for each command line:
absl defines an override's flag once per set of flags.
"""

import os
import sys

import absl.flags
from hypothesis import given
from hypothesis import strategies as st
from ml_collections import config_flags
import pytest

from additive_jax import command
from cli_helpers import ROOT, sst2_config
from fuzz_helpers import fuzz

CONFIG_FILE = os.path.join(ROOT, 'configs', 'sst2.py')
KEYS = command._config_keys(sst2_config())
# ml_collections loads the config file with the deprecated load_module, once per command line
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')


def parse(overrides: list[str]) -> list[str]:
  """`command.parse_flags` of a main.py command line with `overrides`."""
  flag_values = absl.flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config file',
                                  flag_values=flag_values, lock_config=True)
  absl.flags.DEFINE_string('workdir', None, 'the run', flag_values=flag_values, required=True)
  argv = ['main', f'--config={CONFIG_FILE}:pfeiffer,runlocal', '--workdir=/tmp/unused', *overrides]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(absl.flags, 'FLAGS', flag_values)
    patch.setattr(sys, 'argv', argv)  # where config_flags looks for the overrides
    return command.parse_flags(argv)


def one_line_error_or_parsed(overrides: list[str]) -> str | None:
  """The command's error line, or None when the command line parses."""
  try:
    rest = parse(overrides)
  except SystemExit as exit:
    message = exit.code
    assert isinstance(message, str) and message.startswith('error: '), message
    assert len(message.splitlines()) == 1, message
    return message
  assert rest == ['main']
  return None


@st.composite
def keys(draw) -> str:
  """A key of the config, one a typo away, a method the run does not train, or nonsense."""
  key = draw(st.sampled_from(KEYS))
  kind = draw(st.sampled_from(('real', 'real', 'typo', 'extra', 'other_method', 'random')))
  if kind == 'typo' and key:
    at = draw(st.integers(0, len(key) - 1))
    return key[:at] + draw(st.sampled_from(['', 'x', '.', '_', '..'])) + key[at + 1:]
  if kind == 'extra':
    return key + '.' + draw(st.text(max_size=4))
  if kind == 'other_method':
    return 'peft.' + draw(st.sampled_from(['lora', 'ia3', 'prefix', ''])) + '.rank'
  if kind == 'random':
    return draw(st.text(max_size=8))
  return key


# Values for fields of every type (ints, floats, booleans, tuples, dicts, strings) and the
# literals that break a parser: nesting past the recursion limit, numbers past every limit.
VALUES = st.one_of(
    st.text(max_size=8), st.integers().map(str), st.floats().map(repr),
    st.sampled_from(['', 'True', 'false', 'None', '(1, 2)', '(1,', '[1, 2]', "{'a': 1}",
                     "{'label': {'1': ' World'}}", "('label', 'text')", 'lambda: 0',
                     '__import__("os")', '1e999', '-1', '0x10', '9' * 5000, '(' * 300, '[' * 300,
                     '{' * 300, '-' * 3000 + '1', '(' * 100 + ')' * 100, '\x00', 'a\nb']))


@st.composite
def overrides(draw) -> str:
  key = draw(keys())
  form = draw(st.sampled_from(('value', 'value', 'value', 'bare', 'negated')))
  if form == 'bare':
    return f'--config.{key}'
  if form == 'negated':
    return f'--noconfig.{key}'
  return f'--config.{key}={draw(VALUES)}'


@fuzz(600)
@given(command=st.lists(overrides(), min_size=1, max_size=3))
def test_an_override_parses_or_is_one_line_of_error(command):
  one_line_error_or_parsed(command)


# Regressions: what the fuzzing found, one command line each.

def test_a_value_nested_past_the_recursion_limit_is_one_line_naming_its_flag():
  # ast.literal_eval raised the RecursionError through absl and config_flags: a traceback
  assert one_line_error_or_parsed(['--config.mesh=' + '-' * 3000 + '1']) == (
      'error: --config.mesh: the value nests too deeply to parse (maximum recursion depth '
      'exceeded during ast construction)')


@pytest.mark.parametrize('key', ['a\nb', 'accumulation.\x1e'], ids=['newline', 'separator'])
def test_a_key_with_a_line_break_is_still_one_line(key):
  message = one_line_error_or_parsed([f'--config.{key}=1'])
  assert message.startswith('error: --config.') and f'has no key {key!r}' in message
