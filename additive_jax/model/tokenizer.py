"""`load_tokenizer(path)`: a `transformers.PreTrainedTokenizerFast` with its chat template.

For an HF directory it is the directory's own `tokenizer.json`. For a GGUF file
it is built here, without torch, from the metadata llama.cpp stores: the
byte-level BPE vocabulary and merges (`tokenizer.ggml.model == 'gpt2'`), the
pre-tokenizer named by `tokenizer.ggml.pre`, the special-token ids, and
`tokenizer.chat_template`.
"""

from __future__ import annotations

import os

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

from additive_jax.model.gguf_checkpoint import metadata, open_gguf
from additive_jax.model.load import resolve

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, path: str):
  """The split llama.cpp applies for `tokenizer.ggml.pre` (llama-vocab.cpp)."""
  if pre in ('default', 'gpt2', 'gpt-2'):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ('smollm', 'starcoder', 'refact'):  # single digits, then the GPT-2 regex
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ('llama3', 'llama-v3', 'llama-bpe'):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f'{path}: tokenizer pre-tokenizer {pre!r} is not supported '
                   '(supported: gpt2, smollm, starcoder, refact, llama-bpe)')


def tokenizer_from_gguf(path: str) -> transformers.PreTrainedTokenizerFast:
  reader = open_gguf(path)

  def need(key):
    value = metadata(reader, key)
    if value is None:
      raise ValueError(f'{path}: metadata field {key!r} is missing, so the file carries no '
                       'tokenizer')
    return value

  kind = need('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'{path}: tokenizer model {kind!r} is not supported (supported: gpt2, '
                     'byte-level BPE)')
  tokens = need('tokenizer.ggml.tokens')
  merges = need('tokenizer.ggml.merges')
  types = metadata(reader, 'tokenizer.ggml.token_type') or [1] * len(tokens)
  vocab = {token: index for index, token in enumerate(tokens)}
  bpe = models.BPE(vocab, [tuple(m.split(' ', 1)) for m in merges], fuse_unk=False,
                   byte_fallback=False)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(metadata(reader, 'tokenizer.ggml.pre', 'default'), path)
  tok.decoder = decoders.ByteLevel()
  # llama.cpp token types: 3 = control (special, never split), 4 = user-defined (added, not special)
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                          for t, kind in zip(tokens, types) if kind == 3])
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                  for t, kind in zip(tokens, types) if kind == 4])

  def special(name):
    key = f'tokenizer.ggml.{name}_token_id'
    index = metadata(reader, key)
    if index is not None and not 0 <= index < len(tokens):
      raise ValueError(f'{path}: metadata field {key!r} is {index}, outside the vocabulary of '
                       f'{len(tokens)} tokens')
    return None if index is None else tokens[index]

  bos = special('bos')
  if metadata(reader, 'tokenizer.ggml.add_bos_token', False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, vocab[bos])])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=special('eos'), unk_token=special('unknown'),
      pad_token=special('padding'), chat_template=metadata(reader, 'tokenizer.chat_template'),
      clean_up_tokenization_spaces=False)


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
  """The tokenizer of an HF directory, a GGUF file or the embedded default."""
  path = resolve(path)
  if os.path.isdir(path):
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  return tokenizer_from_gguf(path)
