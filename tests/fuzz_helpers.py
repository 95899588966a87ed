"""Shared by the fuzz tests (hypothesis): one deterministic budget, the property every target
shares (a result, or the project's documented error naming what was bad), and the corruptions
of bytes and JSON they feed the readers.

Each test runs a fixed number of examples drawn from a fixed seed (`derandomize`), with no
example database: a run is the same on every machine and costs a known time. Hypothesis keeps
its caches (Unicode tables) under the project's cache folder, not in a `.hypothesis/` folder of
the working directory. A test asks for more or fewer examples with `fuzz(n)`.
"""

import contextlib
import json
import os
import signal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from additive_jax.data.config import cache_dir

if not os.environ.get('HYPOTHESIS_STORAGE_DIRECTORY'):
  set_hypothesis_home_dir(os.path.join(cache_dir(), 'hypothesis'))
settings.register_profile(
    'fuzz', max_examples=100, deadline=None, derandomize=True, database=None,
    # the examples are files on disk and loaders, slower than hypothesis expects
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])


def fuzz(max_examples: int):
  """The fuzz profile with its own example budget (the test's time budget)."""
  return settings(settings.get_profile('fuzz'), max_examples=max_examples)


class Hang(BaseException):
  """A call that ran past its time limit: fuzzed inputs are small, so every call is fast. Not an
  Exception, so that a loader's `except Exception` does not turn it into its documented error."""


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raises `Hang` in the main thread once `seconds` have passed (SIGALRM)."""
  def hang(signum, frame):
    raise Hang(f'still running after {seconds} s')
  previous = signal.signal(signal.SIGALRM, hang)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def outcome(call, documented: tuple[type[BaseException], ...], *named: str, seconds: float = 5):
  """`call()`'s result, or the error it raised when that is one of the `documented` types and
  its message holds each of `named` (the file, the config key). Any other exception, a bare
  KeyError or UnicodeDecodeError, or a call that runs past `seconds` (`Hang`), propagates and
  fails the test."""
  try:
    with time_limit(seconds):
      return call()
  except documented as err:
    message = str(err)
    for name in named:
      assert name in message, f'{type(err).__name__} does not name {name!r}: {message}'
    return err


def snapshot(directory: str) -> dict[str, bytes]:
  """Every file under `directory` (relative path -> bytes): equal before and after a failed
  call when the call left nothing behind."""
  found = {}
  for folder, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


# Bytes that break a reader: NUL, an invalid UTF-8 start byte, a truncated two-byte sequence,
# line ends of every kind, separators, quotes, and the brackets of JSON.
NASTY_BYTES = (b'\x00', b'\xff', b'\xc3', b'\xe2\x82', b'\r', b'\n', b'\r\n', b'\t', b',', b'"',
               b'{', b'}', b'[', b']', b':', b'\\', b' ', b'\x0b', b'\x1c', b'\xc2\x85')


@st.composite
def corrupted(draw, data: bytes, max_edits: int = 4) -> bytes:
  """`data` with a few edits: a byte overwritten, nasty bytes inserted, a slice cut out or
  duplicated, or the whole cut short (a truncated file)."""
  data = bytearray(data)
  for _ in range(draw(st.integers(1, max_edits))):
    at = draw(st.integers(0, len(data)))
    edit = draw(st.sampled_from(('overwrite', 'insert', 'delete', 'duplicate', 'truncate')))
    if edit == 'overwrite' and at < len(data):
      data[at] = draw(st.integers(0, 255))
    elif edit == 'insert':
      data[at:at] = draw(st.sampled_from(NASTY_BYTES)) * draw(st.integers(1, 3))
    elif edit == 'delete':
      del data[at:at + draw(st.integers(1, 8))]
    elif edit == 'duplicate':
      data[at:at] = data[at:at + draw(st.integers(1, 16))]
    elif edit == 'truncate':
      del data[at:]
  return bytes(data)


# JSON values of every kind, small, with the awkward ones: huge and negative numbers (10**400
# is past a float), NaN, the values that mean "unset" (null, false, [], {}), strings with NUL
# and quotes.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3),
    st.sampled_from([0, -1, 2**31, 2**40, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(['', '\x00', '"', 'LORA', 'IA3', 'q_proj', 'relu', 'bottleneck', 'llama']))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                          st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutated_json(draw, value: dict) -> dict:
  """`value` (a JSON object) with a few keys, top-level or one level down, deleted or given
  another value of any type."""
  value = json.loads(json.dumps(value))  # a deep copy
  for _ in range(draw(st.integers(1, 3))):
    node = value
    nested = [k for k, v in value.items() if isinstance(v, dict) and v]
    if nested and draw(st.booleans()):
      node = value[draw(st.sampled_from(sorted(nested)))]
    key = draw(st.one_of(st.sampled_from(sorted(node) or ['x']), st.text(max_size=6)))
    edit = draw(st.sampled_from(('delete', 'wrap', 'replace', 'replace')))
    if edit == 'delete':
      node.pop(key, None)
    elif edit == 'wrap':  # the same value one level down: ['q_proj'] -> [['q_proj']], 2 -> [2]
      node[key] = [node.get(key)] if draw(st.booleans()) else {'value': node.get(key)}
    else:
      node[key] = draw(JSON_VALUES)
  return value


@st.composite
def json_file(draw, value: dict) -> bytes:
  """The bytes of a JSON file holding `value`: mutated, corrupted as bytes, or not an object."""
  kind = draw(st.sampled_from(('mutated', 'mutated', 'mutated', 'corrupted', 'other')))
  if kind == 'corrupted':
    return draw(corrupted(json.dumps(value).encode()))
  if kind == 'other':
    return json.dumps(draw(JSON_VALUES)).encode()
  return json.dumps(draw(mutated_json(value))).encode()
