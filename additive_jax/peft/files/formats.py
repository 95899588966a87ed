"""One entry point each way for adapter files, whatever the format.

    save_adapter('out/adapter', model.peft, variables['peft'], config, format='aj')
    methods, peft = load_adapter('out/adapter', config)
    model = aj.Llama(config, peft=methods)
    logits = model.apply({'params': params, 'peft': peft}, tokens)

Formats:
  'aj'          ours (`aj_adapter_config.json` + `aj_adapter.safetensors`): any method set,
                every leaf as trained (aj_format.py)
  'hf_peft'     Hugging Face PEFT: LoRA, (IA)³, prompt or prefix tuning, adaption prompts,
                P-tuning's inference form (hf_peft.py)
  'adapterhub'  AdapterHub `adapters`: a bottleneck (Pfeiffer, Houlsby, parallel), Compacter,
                LoRA, prefix tuning, ReFT, or a union of a prefix, a bottleneck and a LoRA
                (MAM, UniPELT) as one adapter (adapterhub.py); a Sequential as a Stack, one
                adapter directory each, 0/, 1/, … (adapterhub_stack.py); an AdapterFusion as a
                setup folder of the fusion layer and its adapters (adapterhub_fusion.py)

Combinations. PEFT files hold one method per directory and PEFT cannot apply
two of ours together; AdapterHub's `ConfigUnion` holds a prefix, a bottleneck and
a LoRA together, no other set. Another combination saved in those formats is
refused, naming its methods: save it as 'aj', or each method to its own
directory (`save_adapter(d, [m], {m.key: peft[m.key]}, config, format=...)`).
Methods with no equivalent there (bottleneck in PEFT, (IA)³ and prompt tuning in
AdapterHub, ladder side tuning in both) are refused too.

Loading detects the format from the file names (AdapterHub and PEFT share
`adapter_config.json`; PEFT's has a `peft_type`), checks every tensor against
the base `config` and names the tensor, the shape found and the shape needed.
`expected_methods` refuses an adapter for another method set. A pickle
(`adapter_model.bin`, `pytorch_adapter.bin`) is read only with `allow_pickle=True`.
"""

from __future__ import annotations

import jax

from etils import epath

from additive_jax.peft.files import (adapterhub, adapterhub_fusion, adapterhub_stack, aj_format,
                                       hf_peft)
from additive_jax.peft.files.complete import check_complete
from additive_jax.peft.files.file_io import AdapterFileError, check_shapes, read_json
from additive_jax.model.hooks import check_methods

FORMATS = ('aj', 'hf_peft', 'adapterhub')
FORMAT_NAMES = {'aj': 'additive_jax', 'hf_peft': 'Hugging Face PEFT', 'adapterhub': 'AdapterHub'}


def save_adapter(directory: str, methods, peft, config, format: str = 'aj',
                 base_model_name_or_path: str | None = None) -> None:
  """Writes the methods' trees of `peft` (variables['peft']) to `directory` in `format`."""
  methods = tuple(methods)
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  if not methods:
    raise ValueError('no methods to save')
  check_methods(methods, config)
  missing = [m.key for m in methods if m.key not in peft]
  if missing:
    raise ValueError(f'the peft tree has no subtree for {missing} (it has {sorted(peft)})')
  calls = ', '.join(m.call_string() for m in methods)
  check_shapes(aj_format.leaf_shapes(methods, config), aj_format.flat_leaves(methods, peft),
               f'the peft tree of {calls}')
  if format == 'hf_peft' and len(methods) > 1 or (
      format == 'adapterhub' and len(methods) > 1 and not adapterhub.combinable(methods)):
    raise AdapterFileError(
        f'{FORMAT_NAMES[format]} files hold one method per directory, and {calls} are several; '
        'save them with format="aj", or each method to its own directory')
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  if format == 'aj':
    aj_format.save(directory, methods, peft, config, base_model_name_or_path)
  elif format == 'adapterhub' and adapterhub_stack.holds_stack(methods):  # a directory an adapter
    adapterhub_stack.save(directory, methods[0], peft[methods[0].key], config,
                          base_model_name_or_path)
  elif format == 'adapterhub' and methods[0].key == 'fusion':  # the fusion and its adapters
    adapterhub_fusion.save(directory, methods[0], peft['fusion'], config, base_model_name_or_path)
  elif format == 'adapterhub':  # one method, or a union of a prefix, a bottleneck and a LoRA
    adapterhub.save(directory, methods, peft, config, base_model_name_or_path)
  else:
    hf_peft.save(directory, methods[0], peft[methods[0].key], config, base_model_name_or_path)


def detect_format(directory: str) -> str:
  """Which format `directory` holds, from its file names and PEFT's `peft_type`."""
  if not epath.Path(directory).is_dir():
    raise AdapterFileError(f'{directory} is not a directory')
  found = []
  if (epath.Path(directory) / aj_format.CONFIG_NAME).exists():
    found.append('aj')
  shared = str(epath.Path(directory) / hf_peft.CONFIG_NAME)  # AdapterHub's CONFIG_NAME as well
  if epath.Path(shared).exists():
    found.append('hf_peft' if 'peft_type' in read_json(shared) else 'adapterhub')
  elif adapterhub_stack.is_stack_directory(directory):  # a Sequential: 0/, 1/, … each an adapter
    found.append('adapterhub')
  elif adapterhub_fusion.holds_fusion(directory):  # AdapterHub's fusion: a setup folder
    found.append('adapterhub')
  if not found:
    raise AdapterFileError(f'{directory} holds no adapter (no {aj_format.CONFIG_NAME} or '
                           f'{hf_peft.CONFIG_NAME})')
  if len(found) > 1:
    raise AdapterFileError(f'{directory} holds adapters in several formats ({", ".join(found)}); '
                           'pass format=')
  return found[0]


def load_adapter(directory: str, config, format: str | None = None, expected_methods=None,
                 allow_pickle: bool = False):
  """(methods, peft) from `directory`, for the base `config`: `Llama(config, peft=methods)`
  applies `{'params': params, 'peft': peft}`. `format` is detected when None. The leaves are
  placed on the default device once, as `load_model`'s weights are. A folder our commands
  half-wrote (complete.py's markers) is refused, named."""
  check_complete(directory)
  format = format or detect_format(directory)
  if format == 'aj':
    methods, peft = aj_format.load(directory, config)
  elif format == 'adapterhub' and adapterhub_stack.is_stack_directory(directory):
    methods, peft = adapterhub_stack.load(directory, config, allow_pickle)
  elif format == 'adapterhub' and adapterhub_fusion.holds_fusion(directory):
    methods, peft = adapterhub_fusion.load(directory, config, allow_pickle)
  elif format == 'adapterhub':
    methods, peft = adapterhub.load(directory, config, allow_pickle)
  elif format == 'hf_peft':
    method, tree = hf_peft.load(directory, config, allow_pickle)
    methods, peft = (method,), {method.key: tree}
  else:
    raise ValueError(f'format must be one of {FORMATS} or None, got {format!r}')
  try:
    check_methods(methods, config)
  except ValueError as err:
    raise AdapterFileError(f'{directory}: {err}') from None
  if expected_methods is not None and tuple(expected_methods) != methods:
    raise AdapterFileError(
        f'{directory} holds {", ".join(m.call_string() for m in methods)}, not the expected '
        f'{", ".join(m.call_string() for m in expected_methods)}')
  return methods, jax.device_put(peft)
