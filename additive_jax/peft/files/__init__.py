"""Adapter files: ours, Hugging Face PEFT's and AdapterHub's, and a merged HF checkpoint.

    aj.peft.save_adapter(directory, methods, peft, config, format='aj'|'hf_peft'|'adapterhub')
    methods, peft = aj.peft.load_adapter(directory, config)
    aj.peft.save_merged(directory, model, variables)      # (IA)³ / LoRA folded in

See formats.py for the formats and how a combination of methods is handled.
"""

from additive_jax.peft.files.file_io import AdapterFileError
from additive_jax.peft.files.formats import FORMATS, detect_format, load_adapter, save_adapter
from additive_jax.peft.files.merged import save_merged
