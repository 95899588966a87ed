"""Memory: a file whose header claims a huge tensor is refused before anything of its size is
allocated. A child process loads such files with its data segment limited to 1 GiB above what
it holds after its imports (RLIMIT_DATA: every allocation counts, a file mapped read-only does
not, so a sparse file of many GiB may be mapped), and must get the error, fast.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import gguf
import numpy as np

from additive_jax.model.convert import config_to_hf
from additive_jax.peft.files.aj_format import BASE_FACTS
from conftest import TINY
from fuzz_file_helpers import SMALL, join_safetensors, random_tensors, read, write, write_gguf
from fuzz_file_helpers import adapters  # noqa: F401 (a fixture)

# Memory: files whose headers claim tensors of 2 GiB to 4 TiB, loaded in a child process that may
# allocate 1 GiB at most (RLIMIT_DATA). Each must be refused with the documented error, fast.

CHILD = r'''
import json, resource, signal, sys, time
import jax.numpy
import additive_jax as aj
from additive_jax.peft.files import load_adapter
jax.numpy.zeros(1).block_until_ready()  # the CPU backend's own memory comes before the limit

with open('/proc/self/status') as f:
  held = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmData:'))
resource.setrlimit(resource.RLIMIT_DATA, (held + 2**30, held + 2**30))


class Hang(BaseException):  # not an Exception: a loader's `except Exception` lets it through
  pass


def hang(signum, frame):
  raise Hang


signal.signal(signal.SIGALRM, hang)
for case, kind, path, base in json.loads(sys.argv[1]):
  start = time.perf_counter()
  signal.alarm(10)
  try:
    load_adapter(path, aj.LlamaConfig(**base)) if kind == 'adapter' else aj.load_model(path)
    error = None
  except Exception as err:
    error = f'{type(err).__name__}: {err}'
  except Hang:
    error = 'Hang: still loading after 10 s'
  signal.alarm(0)
  print(json.dumps([case, error, time.perf_counter() - start]), flush=True)
'''


def huge_safetensors(path, name, shape, length=None, sparse=False) -> None:
  """A safetensors file whose header declares one F32 tensor `name` of `shape` (and its bytes):
  the file ends after 16 bytes of data, or, `sparse`, runs on as far as the header says."""
  size = 4 * int(np.prod(shape, dtype=object))
  write(path, join_safetensors({name: {'dtype': 'F32', 'shape': list(shape),
                                       'data_offsets': [0, size]}}, b'\0' * 16, length))
  if sparse:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) - 16 + size)


def test_a_header_claiming_huge_tensors_is_refused_before_allocating(tmp_path, adapters):
  def hf_directory(case, **claim):
    directory = tmp_path / case
    directory.mkdir()
    (directory / 'config.json').write_text(json.dumps(config_to_hf(SMALL)))
    huge_safetensors(str(directory / 'model.safetensors'), 'model.embed_tokens.weight', **claim)
    return 'model', str(directory), None

  def lora_directory(case, **claim):
    directory = tmp_path / case
    shutil.copytree(adapters['hf_lora'], directory)
    huge_safetensors(str(directory / 'adapter_model.safetensors'),
                     'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', **claim)
    return 'adapter', str(directory), {fact: getattr(TINY, fact) for fact in BASE_FACTS}

  def gguf_path(case, **written):
    return 'model', write_gguf(tmp_path / f'{case}.gguf', SMALL, **written), None

  byte_count = {'fuzz.bytes': ([1, 2, 3], gguf.GGUFValueType.UINT8)}
  cases = {  # case -> (kind, path, base) and the error it must get
      'hf_2**40_elements': (hf_directory('hf_2**40_elements', shape=(2**40,)),
                            r'ModelLoadError: .*model\.safetensors: not a readable safetensors'),
      'hf_2GiB_sparse': (hf_directory('hf_2GiB_sparse', shape=(2**28, 2), sparse=True),
                         r"ModelLoadError: .*model\.safetensors: tensor "
                         r"'model\.embed_tokens\.weight' has shape \(268435456, 2\), the config "
                         r'implies \(11, 8\)'),
      'gguf_2**40_elements': (gguf_path('gguf_2**40_elements',
                                        claims={'model.embed_tokens.weight': (2**20, 2**20)}),
                              r'ModelLoadError: .*not a readable GGUF file \(ValueError: a read of '
                              r'1099511627776 × float32 at byte \d+ runs past the end of the '
                              r'file'),
      'gguf_2GiB_sparse': (gguf_path('gguf_2GiB_sparse', sparse=True,
                                     claims={'model.embed_tokens.weight': (2**26, 8)}),
                           r"ModelLoadError: .*tensor 'token_embd\.weight' \(model\.embed_tokens\."
                           r'weight\) has shape \(67108864, 8\), the config implies \(11, 8\)'),
      'gguf_array_of_2**40': (gguf_path('gguf_array_of_2**40', arrays=byte_count,
                                        tensors=random_tensors(SMALL)),
                              r'ModelLoadError: .*not a readable GGUF file \(ValueError: a read of '
                              r'1 × uint8 at byte \d+ runs past the end of the file'),
      'adapter_2**40_elements': (lora_directory('adapter_2**40_elements', shape=(2**40,)),
                                 r'AdapterFileError: .*adapter_model\.safetensors: not a readable '
                                 r'safetensors file'),
      'adapter_header_of_2**63_bytes': (lora_directory('adapter_header_of_2**63_bytes', shape=(2,),
                                                       length=2**63),
                                        r'AdapterFileError: .*not a readable safetensors file'),
  }
  # the array's count, 3, claims 2**40 bytes instead
  path = cases['gguf_array_of_2**40'][0][1]
  data = bytearray(read(path))
  at = data.index(b'fuzz.bytes') + len(b'fuzz.bytes') + 8  # after the value type and item type
  assert struct.unpack('<Q', data[at:at + 8]) == (3,)
  write(path, bytes(data[:at]) + struct.pack('<Q', 2**40) + bytes(data[at + 8:]))

  listed = [[case, *where] for case, (where, _) in cases.items()]
  child = subprocess.run([sys.executable, '-c', CHILD, json.dumps(listed)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert child.returncode == 0, child.stderr[-3000:]
  results = {case: (error, seconds) for case, error, seconds in map(json.loads,
                                                                    child.stdout.splitlines())}
  assert results.keys() == cases.keys(), child.stderr[-3000:]
  for case, (_, pattern) in cases.items():
    error, seconds = results[case]
    assert error is not None and re.fullmatch(pattern + '.*', error, re.DOTALL), (case, error)
    assert seconds < 5, (case, seconds)


# Regressions: what the fuzzing found, one input each.
