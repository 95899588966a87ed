"""Additive PEFT methods; each acts at the Llama's named sites (see base.py)."""

from additive_jax.peft.adaption_prompt import AdaptionPrompt
from additive_jax.peft.average import average
from additive_jax.peft.base import Method
from additive_jax.peft.bottleneck import Bottleneck
from additive_jax.peft.compacter import Compacter
from additive_jax.peft.fusion import Fusion
from additive_jax.peft.ia3 import IA3
from additive_jax.peft.ladder import LadderSide
from additive_jax.peft.lora import LoRA
from additive_jax.peft.lora_merges import merge_lora
from additive_jax.peft.merge import merge, unmerge
from additive_jax.peft.prefix import PrefixTuning
from additive_jax.peft.prompt import PromptTuning
from additive_jax.peft.ptuning import PTuning
from additive_jax.peft.reft import ReFT
from additive_jax.peft.sequential import Sequential
from additive_jax.peft.stack import stack
from additive_jax.peft.files import AdapterFileError, load_adapter, save_adapter, save_merged
