"""Reads a Hugging Face checkpoint directory: `config.json` + safetensors.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
checkpoints. A PyTorch pickle (`pytorch_model.bin`) is never unpickled unless the
caller opts in with `allow_pickle=True`, and then only with
`torch.load(weights_only=True)`; `read_tensor_pickle` is that one reader, shared with
the adapter files. Every error names the file it comes from.
"""

from __future__ import annotations

import json
import os

from etils import epath
import numpy as np
import safetensors

from additive_jax.model.config import ConfigError, LlamaConfig
from additive_jax.model.convert import ModelLoadError, hf_tensor_shapes, params_from_hf


def read_json(path: str, error: type[ValueError]):
  """A JSON file's value; a file that is not JSON raises `error` naming it."""
  try:
    return json.loads(epath.Path(path).read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise error(f'{path}: not valid JSON ({err})') from None


def read_config_json(path: str, **overrides) -> LlamaConfig:
  """The config of an HF `config.json` file; an error names the file and the field."""
  raw = read_json(path, ConfigError)
  try:
    return LlamaConfig.from_hf(raw, **overrides)
  except ConfigError as err:
    raise ConfigError(f'{path}: {err}') from None
  # a field of another JSON type than from_hf checks for: "architectures": true is not a list
  # (TypeError), a "rope_theta" integer of 400 digits does not fit a float (OverflowError)
  except (TypeError, OverflowError) as err:
    raise ConfigError(f'{path}: not a Llama config ({type(err).__name__}: {err})') from None


def read_hf_config(directory: str, **overrides) -> LlamaConfig:
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{directory} has no config.json')
  return read_config_json(path, **overrides)


def _open_safetensors(path: str):
  try:
    return safetensors.safe_open(path, framework='numpy')
  except Exception as err:  # safetensors raises its own error type for corrupt headers
    raise ModelLoadError(f'{path}: not a readable safetensors file ({err})') from None


def _tensor_files(directory: str) -> dict[str, str]:
  """Tensor name -> the safetensors file that holds it."""
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.exists(index):
    contents = read_json(index, ModelLoadError)
    weight_map = contents.get('weight_map') if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      raise ModelLoadError(f'{index}: no "weight_map" object of tensor name -> file name')
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  single = os.path.join(directory, 'model.safetensors')
  if os.path.exists(single):
    with _open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  raise ModelLoadError(f'{directory} has neither model.safetensors nor model.safetensors.index.json')


def _read_safetensors(directory: str, cfg: LlamaConfig, layout) -> dict:
  files = _tensor_files(directory)
  expected = hf_tensor_shapes(cfg)
  handles = {}
  try:
    def read(name):
      path = files[name]  # KeyError -> "missing" in params_from_hf
      if path not in handles:
        if not os.path.exists(path):
          raise ModelLoadError(f'{path}: shard listed in the index does not exist')
        handles[path] = _open_safetensors(path).__enter__()
      try:
        shape = tuple(handles[path].get_slice(name).get_shape())
      except Exception as err:
        raise ModelLoadError(f'{path}: tensor {name!r} cannot be read ({err})') from None
      if shape != expected[name]:  # refused from the header: nothing of its size is allocated
        raise ModelLoadError(f'{path}: tensor {name!r} has shape {shape}, the config implies '
                             f'{expected[name]}')
      try:
        return handles[path].get_tensor(name)
      except Exception as err:
        raise ModelLoadError(f'{path}: tensor {name!r} cannot be read ({err})') from None
    return params_from_hf(cfg, read, directory, layout)
  finally:
    for handle in handles.values():
      handle.__exit__(None, None, None)


def read_tensor_pickle(path: str, error: type[ValueError]) -> dict[str, np.ndarray]:
  """name -> float32 array from a PyTorch pickle of a dict of tensors, read with
  `torch.load(weights_only=True)`, which refuses anything but tensors; a bad file raises
  `error` naming it."""
  import torch  # only for this explicit opt-in
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # a truncated zip, a non-tensor object refused by weights_only, ...
    raise error(f'{path}: not a readable tensor pickle ({err})') from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise error(f'{path}: expected a dict of tensors')
  return {name: tensor.float().numpy() for name, tensor in state.items()}


def load_hf_directory(directory: str, allow_pickle: bool = False, layout=None, **overrides):
  """(config, params) from an HF `LlamaForCausalLM` directory; `layout`: the weights to
  quantize as they are read (model/quant_layout.py)."""
  cfg = read_hf_config(directory, **overrides)
  has_safetensors = any(os.path.exists(os.path.join(directory, name)) for name in
                        ('model.safetensors', 'model.safetensors.index.json'))
  if not has_safetensors and os.path.exists(os.path.join(directory, 'pytorch_model.bin')):
    if not allow_pickle:
      raise ModelLoadError(f'{directory} holds only pytorch_model.bin, a pickle; it is not read '
                            'unless allow_pickle=True (then with torch.load(weights_only=True))')
    path = os.path.join(directory, 'pytorch_model.bin')
    state = read_tensor_pickle(path, ModelLoadError)
    return cfg, params_from_hf(cfg, state.__getitem__, path, layout)
  return cfg, _read_safetensors(directory, cfg, layout)

