"""Chat conversations: what a valid one is, and its text under a tokenizer's chat template.

A conversation is a list of `{"role", "content"}` messages: an optional system
message first, then user and assistant turns, at least one assistant turn, and
a user turn before the first assistant turn.

`conversation_segments` renders it with the tokenizer's chat template as
(text, is_target) segments. An assistant turn is a target from the end of its
generation prompt (SmolLM2's `<|im_start|>assistant\\n`, what a model is given at
inference) through the tokenizer's EOS text that ends it (`<|im_end|>`); the
role headers, the system and user turns and what the template writes after an
EOS (SmolLM2's newline) are not. The text after the last assistant turn is
left out: nothing in it is learned.

Each assistant turn is found by rendering the conversation up to it with the
generation prompt, and up to its end; a template that does not render a
conversation as a growing text (each rendering a prefix of the next) is refused.
"""

from __future__ import annotations

from typing import Sequence

ROLES = ('system', 'user', 'assistant')


def check_conversation(value, where: str) -> list[dict[str, str]]:
  """The messages of a row's conversation field, as `{role, content}` dicts; `where` (file:line
  and field) starts every error."""
  if not isinstance(value, list) or not value:
    raise ValueError(f'{where} must be a list of {{"role", "content"}} messages, got '
                     f'{type(value).__name__} {value!r:.80}')
  messages = []
  for number, message in enumerate(value, 1):
    if not isinstance(message, dict) or not isinstance(message.get('content'), str):
      raise ValueError(f'{where}: message {number} is not a {{"role", "content"}} object with '
                       f'text content: {message!r:.80}')
    role = message.get('role')
    if role not in ROLES:
      raise ValueError(f'{where}: message {number} has role {role!r}, not one of '
                       f'{", ".join(ROLES)}')
    if role == 'system' and number > 1:
      raise ValueError(f'{where}: message {number} is a system message; only the first may be')
    messages.append({'role': role, 'content': message['content']})
  roles = [message['role'] for message in messages]
  if 'assistant' not in roles:
    raise ValueError(f'{where}: no assistant turn (roles: {", ".join(roles)}): nothing to learn')
  if 'user' not in roles[:roles.index('assistant')]:
    raise ValueError(f'{where}: message {roles.index("assistant") + 1} is an assistant turn with '
                     'no user turn before it')
  return messages


def conversation_segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
  """(text, is_target) segments of the rendered conversation, ending with its last target."""
  render = lambda upto, prompt=False: tokenizer.apply_chat_template(
      list(messages[:upto]), tokenize=False, add_generation_prompt=prompt)
  eos = tokenizer.eos_token
  segments, done = [], ''  # `done`: the text given to segments so far
  for index, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    prompt, full = render(index, prompt=True), render(index + 1)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise ValueError('the chat template does not render the assistant turn after the '
                       f'generation prompt: {prompt!r} is not a prefix of {full!r}')
    turn = full[len(prompt):]
    end = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn)
    segments += [(prompt[len(done):], False), (turn[:end], True)]
    done = prompt + turn[:end]
  return segments
