"""Templates: (prompt, response) text pairs to (prompt ids, response ids).

* `plain`: the prompt, then the response, then EOS. The prompt is tokenized
  with the tokenizer's special tokens (a BOS where the tokenizer adds one), the
  response without.
* `chat`: the tokenizer's own chat template with the prompt as the user turn
  and the response as the assistant turn. The prompt part is the rendering of
  the user turn with the generation prompt (what a model is given at inference);
  the response part is the rest of the full rendering, cut after its last EOS
  (SmolLM2's `<|im_end|>`; the newline the template writes after it is not a
  target).

Both halves are tokenized separately so that the boundary between what is
masked and what is learned is exact; the response always ends with the
tokenizer's EOS id, appended when the rendering has none.

The fast tokenizer's Rust backend does the tokenizing: it encodes a batch in
parallel, and it is safe to share between grain's reader threads, whereas the
Python wrapper may first reset the backend's truncation and padding, which
fails ("Already borrowed") while another thread is encoding.
"""

from __future__ import annotations

from typing import Sequence

TEMPLATES = ('plain', 'chat')


class PairEncoder:
  """`encoder(prompts, responses)` → [(prompt_ids, response_ids)], the response ending in EOS."""

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

  def texts(self, prompt: str, response: str) -> tuple[str, str]:
    """The prompt and response texts the template renders."""
    if self.template == 'plain':
      return prompt, response
    user = [{'role': 'user', 'content': prompt}]
    prompt_text = self.tokenizer.apply_chat_template(user, tokenize=False,
                                                     add_generation_prompt=True)
    full_text = self.tokenizer.apply_chat_template(
        user + [{'role': 'assistant', 'content': response}], tokenize=False)
    if not full_text.startswith(prompt_text):
      raise ValueError('the chat template does not render the assistant turn after the '
                       f'generation prompt: {prompt_text!r} is not a prefix of {full_text!r}')
    return prompt_text, full_text[len(prompt_text):]

  def _end_with_eos(self, ids: list[int]) -> list[int]:
    if self.eos_id in ids:
      return ids[:len(ids) - ids[::-1].index(self.eos_id)]
    return ids + [self.eos_id]

  def __call__(self, prompts: Sequence[str],
               responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    prompt_texts, response_texts = zip(*map(self.texts, prompts, responses))
    backend = self.tokenizer.backend_tokenizer
    # With the plain template the prompt is the start of the text: the tokenizer's
    # special tokens (a BOS) go there. A chat rendering writes its own.
    prompt_encodings = backend.encode_batch(list(prompt_texts),
                                            add_special_tokens=self.template == 'plain')
    response_encodings = backend.encode_batch(list(response_texts), add_special_tokens=False)
    return [(p.ids, self._end_with_eos(r.ids)) for p, r in zip(prompt_encodings,
                                                              response_encodings)]
