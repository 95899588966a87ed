"""Templates: an example's text to token-id segments, each marked target or not.

An example is a (prompt, response) pair `{'prompt': str, 'response': str}`, or
a conversation `{'messages': [{role, content}, ...]}`. Its segments are
`[(ids, is_target), ...]`; the loss is on the target ids only.

* `plain` (pairs only): the prompt, then the response, then EOS. The prompt is
  tokenized with the tokenizer's special tokens (a BOS where the tokenizer adds
  one), the response without: segments `[(prompt, False), (response, True)]`.
* `chat`: the tokenizer's own chat template (data/chat.py). A pair is the
  conversation user = prompt, assistant = response: the prompt part is the
  rendering of the user turn with the generation prompt (what a model is given
  at inference), the response part the assistant turn through its EOS
  (SmolLM2's `<|im_end|>`; the newline the template writes after it is not a
  target). A conversation gives a target segment per assistant turn.

Each segment is tokenized separately, so that the boundary between what is
masked and what is learned is exact; every target segment ends with the
tokenizer's EOS id, cut after its last one, or appended when it has none.

The fast tokenizer's Rust backend does the tokenizing: it encodes a batch in
parallel, and it is safe to share between grain's reader threads, whereas the
Python wrapper may first reset the backend's truncation and padding, which
fails ("Already borrowed") while another thread is encoding.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from additive_jax.data.chat import conversation_segments

TEMPLATES = ('plain', 'chat')
Segments = list[tuple[list[int], bool]]  # (token ids, whether they are targets), in order


def check_template(spec, template: str) -> None:
  """A conversation source (`spec.messages`) needs the chat template: refused by config key,
  before any data is read."""
  if spec.messages and template != 'chat':
    raise ValueError(f'config.data.template={template!r}: the rows of {spec.name} are '
                     f'conversations ({spec.key}.messages={spec.messages!r}), rendered '
                     "by the tokenizer's chat template: set config.data.template='chat'")


class SegmentEncoder:
  """`encoder(examples)` → the `Segments` of each example (see the module docstring)."""

  def __init__(self, tokenizer, template: str):
    if template not in TEMPLATES:
      raise ValueError(f'unknown template {template!r} (templates: {", ".join(TEMPLATES)})')
    if tokenizer.eos_token_id is None:
      raise ValueError('the tokenizer has no EOS token; responses must end with one')
    if template == 'chat' and not tokenizer.chat_template:
      raise ValueError("template 'chat' needs a tokenizer with a chat template")
    self.tokenizer = tokenizer
    self.template = template
    self.eos_id = tokenizer.eos_token_id

  def texts(self, example: Mapping) -> list[tuple[str, bool]]:
    """The (text, is_target) segments the template renders for one example."""
    if 'messages' in example:
      if self.template != 'chat':
        raise ValueError("a conversation is rendered by the tokenizer's chat template: "
                         f"template {self.template!r} cannot (config.data.template='chat')")
      return conversation_segments(self.tokenizer, example['messages'])
    if self.template == 'plain':
      return [(example['prompt'], False), (example['response'], True)]
    return conversation_segments(self.tokenizer, [
        {'role': 'user', 'content': example['prompt']},
        {'role': 'assistant', 'content': example['response']}])

  def _end_with_eos(self, ids: list[int]) -> list[int]:
    if self.eos_id in ids:
      return ids[:len(ids) - ids[::-1].index(self.eos_id)]
    return ids + [self.eos_id]

  def __call__(self, examples: Sequence[Mapping]) -> list[Segments]:
    texts = [self.texts(example) for example in examples]
    backend = self.tokenizer.backend_tokenizer
    # With the plain template the prompt is the start of the text: the tokenizer's special
    # tokens (a BOS) go there. A chat rendering writes its own.
    firsts = backend.encode_batch([segments[0][0] for segments in texts],
                                  add_special_tokens=self.template == 'plain')
    rests = iter(backend.encode_batch([text for segments in texts for text, _ in segments[1:]],
                                      add_special_tokens=False))
    encoded = []
    for segments, first in zip(texts, firsts):
      ids = [first.ids] + [next(rests).ids for _ in segments[1:]]
      encoded.append([(self._end_with_eos(piece) if is_target else piece, is_target)
                      for piece, (_, is_target) in zip(ids, segments)])
    return encoded


class PairEncoder:
  """`encoder(prompts, responses)` → [(prompt_ids, response_ids)], the response ending in EOS."""

  def __init__(self, tokenizer, template: str):
    self.segments = SegmentEncoder(tokenizer, template)
    self.eos_id = self.segments.eos_id

  def __call__(self, prompts: Sequence[str],
               responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    examples = [{'prompt': p, 'response': r} for p, r in zip(prompts, responses)]
    return [(prompt, response) for (prompt, _), (response, _) in self.segments(examples)]
