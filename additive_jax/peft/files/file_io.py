"""Adapter files on disk: JSON and safetensors with errors that name the file; pickles on opt-in.

Tensors are read as float32 numpy arrays (fp16 and bf16 files are widened: the
trainable leaves are fp32) and written through a temporary file renamed into
place, so an interrupted save never leaves a half-written file under the real
name. Paths go through `etils.epath`, so an adapter may be saved to or read
from `gs://bucket/dir` as well as a local folder. A PyTorch pickle
(`adapter_model.bin`, `pytorch_adapter.bin`) is read only when the caller
passes `allow_pickle=True`, and then with `torch.load(weights_only=True)`,
which refuses anything but tensors.
"""

from __future__ import annotations

import json

from etils import epath
import numpy as np
import safetensors.flax
import safetensors.numpy

from additive_jax.model.hf_checkpoint import read_json as read_json_value, read_tensor_pickle


class AdapterFileError(ValueError):
  """An adapter file that is missing, unreadable, or does not fit the model or the method set."""


def read_json(path: str) -> dict:
  if not epath.Path(path).exists():
    raise AdapterFileError(f'{path} does not exist')
  value = read_json_value(path, AdapterFileError)
  if not isinstance(value, dict):
    raise AdapterFileError(f'{path}: expected a JSON object, got {type(value).__name__}')
  return value


def write_json(path: str, value: dict) -> None:
  staged = epath.Path(path + '.tmp')
  staged.write_text(json.dumps(value, indent=2) + '\n', encoding='utf-8')
  staged.replace(path)


def write_tensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array, any dtype) as safetensors; `metadata={'format': 'pt'}`
  is what transformers asks of a checkpoint it loads."""
  # np.ascontiguousarray makes a 0-d array 1-d: a scalar leaf (a fusion's temperature) keeps ()
  arrays = {name: np.ascontiguousarray(tensor).reshape(np.shape(tensor))
            for name, tensor in tensors.items()}
  staged = epath.Path(path + '.tmp')
  staged.write_bytes(safetensors.numpy.save(arrays, metadata=metadata))
  staged.replace(path)


def read_tensors(directory: str, safetensors_name: str, pickle_name: str | None = None,
                 allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], str]:
  """(name -> float32 array, the path read) from `safetensors_name`, or the pickle on opt-in."""
  path = epath.Path(directory) / safetensors_name
  if path.exists():
    try:  # the flax reader, because numpy has no bfloat16 of its own
      loaded = safetensors.flax.load(path.read_bytes())
    except Exception as err:  # safetensors raises its own error type for a bad header or size
      raise AdapterFileError(f'{path}: not a readable safetensors file ({err})') from None
    return {name: np.asarray(tensor, np.float32) for name, tensor in loaded.items()}, str(path)
  if pickle_name and (epath.Path(directory) / pickle_name).exists():
    pickle_path = str(epath.Path(directory) / pickle_name)
    if not allow_pickle:
      raise AdapterFileError(
          f'{directory} holds {pickle_name}, a pickle, and no {safetensors_name}; a pickle is not '
          'read unless allow_pickle=True (then with torch.load(weights_only=True))')
    return read_tensor_pickle(pickle_path, AdapterFileError), pickle_path
  raise AdapterFileError(f'{directory} has no {safetensors_name}')


def shape_problems(expected: dict[str, tuple[int, ...]], found: dict[str, np.ndarray]) -> list[str]:
  """What differs between the tensors a model needs (name -> shape) and those a file holds."""
  problems = [f'tensor {name!r} has shape {tuple(found[name].shape)}, this model needs '
              f'{tuple(shape)}' for name, shape in expected.items()
              if name in found and tuple(found[name].shape) != tuple(shape)]
  missing = [name for name in expected if name not in found]
  unexpected = sorted(name for name in found if name not in expected)
  if missing:
    problems.append(f'{len(missing)} tensors missing ({_first_few(missing)})')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected tensors ({_first_few(unexpected)})')
  return problems


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, np.ndarray],
                 source: str) -> None:
  problems = shape_problems(expected, found)
  if problems:
    raise AdapterFileError(f'{source}: {join_problems(problems)}')


def join_problems(problems: list[str], shown: int = 4) -> str:
  text = '; '.join(problems[:shown])
  return text + (f'; and {len(problems) - shown} more' if len(problems) > shown else '')


def _first_few(names: list[str], shown: int = 3) -> str:
  text = ', '.join(repr(n) for n in names[:shown])
  return text + (f', … {len(names) - shown} more' if len(names) > shown else '')
