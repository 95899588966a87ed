"""Merged export: a full Hugging Face checkpoint with (IA)³ and LoRA folded into the weights.

    save_merged('out/merged', model, variables)
    transformers.LlamaForCausalLM.from_pretrained('out/merged')   # the same logits, no adapter

Writes `config.json` (`convert.config_to_hf`) and `model.safetensors`
(`convert.params_to_hf`) of `aj.peft.merge(model, variables)['params']`: l_k, l_v
and l_ff multiplied into k_proj, v_proj and down_proj, (α/r)·B·A added to each
LoRA target, in the order the model applies them (see merge.py). A model that
also carries a method that cannot be folded (bottleneck, prompt, prefix, ladder, ReFT)
is refused: a checkpoint without it would silently compute something else;
export those as an adapter (`save_adapter`) instead. The tokenizer is not part
of the checkpoint: copy its files beside it if a consumer needs them.
"""

from __future__ import annotations

from etils import epath

from additive_jax.model.convert import config_to_hf, params_to_hf
from additive_jax.peft.files.file_io import AdapterFileError, write_json, write_tensors
from additive_jax.peft.merge import merge


def save_merged(directory: str, model, variables, allow_low_precision: bool = False) -> None:
  """Writes `directory/config.json` + `model.safetensors` with `model.peft` folded into the base."""
  unmergeable = [m.call_string() for m in model.peft if not m.mergeable]
  if unmergeable:
    raise AdapterFileError(f'{", ".join(unmergeable)} cannot be folded into the base weights; a '
                           'merged checkpoint holds (IA)³ and LoRA only. Export the others with '
                           'save_adapter')
  _, merged = merge(model, variables, allow_low_precision=allow_low_precision)
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  write_tensors(str(epath.Path(directory) / 'model.safetensors'),
                params_to_hf(model.config, merged['params']), {'format': 'pt'})
  write_json(str(epath.Path(directory) / 'config.json'), config_to_hf(model.config))
