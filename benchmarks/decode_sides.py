"""The processes of benchmarks/decode.py: our decoder and transformers' `generate`, each its own.

`Side(label, kind, setup)` spawns a fresh interpreter (`side_process.Side`)
running `serve`, which builds the side (`OursDecoder` or `TheirsDecoder`), warms
it up (one whole decode, which compiles ours) and answers `decode(variant)`
calls over a pipe. An idle side blocks on the pipe, so it takes no CPU while
another side is timed. benchmarks/device_check.py runs the same two sides on an
accelerator, at batch 1 and 64 (theirs with `device='cuda'`).

Our side loads its base as a user does (`aj.load_model('smollm2-135m-instruct')`,
the GGUF, no placement of its own); transformers reads an HF checkpoint of the same
weights. A decode is timed from the outside of the public call, by a callback that each
new token reaches as soon as the host has it: ours through `generate_ids`'
`on_tokens`, theirs through a `generate` streamer. Prefill: from the call to
the first new token (host set-up included: padding, the methods' inference
form, the cache); then one timestamp per token, so each later interval is one
decode step as the caller sees it (dispatch, compute and the host reading the
token).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback

import numpy as np

import side_process  # beside this file, on the path of a script run from here

LORA_ALL = "LoRA(rank=16, alpha=32, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One thing our side decodes: a method (None: the bare base), how it is applied, the batch."""
  method: str | None = None  # a constructor call, as `parse_method` reads it
  merged: bool = False       # folded into the base weights (`aj.peft.merge`)
  batch: int = 1
  stacked: int = 0           # adapters of `method` stacked (`aj.peft.stack`), row b runs adapter b
  bf16_weights: bool = False  # the base stored in bf16 (half the bytes read), computed in fp32


VARIANTS = {
    'base': Variant(),
    'base_bf16_weights': Variant(bf16_weights=True),
    'pfeiffer': Variant('Bottleneck(dim=64)'),
    'houlsby': Variant("Bottleneck(dim=64, placement='houlsby')"),
    'parallel': Variant("Bottleneck(dim=64, placement='parallel', scale=4.0)"),
    'ia3': Variant('IA3()'),
    'ia3_merged': Variant('IA3()', merged=True),
    'lora': Variant(LORA_ALL),
    'lora_merged': Variant(LORA_ALL, merged=True),
    'prompt': Variant('PromptTuning(num_tokens=20)'),
    'prefix': Variant('PrefixTuning(num_tokens=20)'),
    'ladder': Variant('LadderSide(reduction=8)'),
    'lora_x8_one': Variant(LORA_ALL, batch=8),
    'lora_x8_stacked': Variant(LORA_ALL, batch=8, stacked=8),
    'base_x64': Variant(batch=64),
}


def prompt_ids(vocab_size: int, batch: int, length: int) -> list[list[int]]:
  """Seeded random prompts, the same on both sides (speed does not depend on the words);
  row 0 is the batch-1 prompt."""
  rng = np.random.default_rng(0)
  return rng.integers(0, vocab_size, (batch, length)).tolist()


def timing(started: float, stamps: list[float]) -> dict:
  """The prefill (call to first token) and every decode step's interval, in seconds."""
  return {'prefill_s': round(stamps[0] - started, 6),
          'step_s': [round(s, 6) for s in np.diff(stamps).tolist()]}  # µs: far below the noise


def ms_per_token(decode: dict) -> float:
  """The decode loop's time over its steps (at batch 8: per step of 8 tokens)."""
  return 1000 * statistics.fmean(decode['step_s'])


def leading_agreement(ours: list[int], theirs: list[int]) -> int:
  """How many first greedy tokens both sides share (fp32 sums differ, so they may part late)."""
  shared = min(len(ours), len(theirs))
  return next((i for i in range(shared) if ours[i] != theirs[i]), shared)


class OursDecoder:
  """additive_jax's `generate_ids`, greedy, on every variant asked for, all in this process."""

  def __init__(self, model, variants, prompt_tokens, new_tokens):
    import jax

    import additive_jax as aj

    self.jax, self.aj, self.new_tokens = jax, aj, new_tokens
    # as a user loads it (the embedded default: its GGUF), with no placement of our own
    self.config, self.params = aj.load_model(model)
    self.built, warmup_s, tokens = {}, {}, {}
    for name in variants:
      self.built[name] = self.build(VARIANTS[name], prompt_tokens)
      started = time.perf_counter()
      tokens[name] = self.decode(name)['tokens']  # compiles the prefill and the decode step
      warmup_s[name] = time.perf_counter() - started
    self.report = {
        'platform': jax.default_backend(), 'device': jax.devices()[0].device_kind,
        'base_params': sum(x.size for x in jax.tree.leaves(self.params)),
        'base_bytes': sum(x.nbytes for x in jax.tree.leaves(self.params)),
        'warmup_s': warmup_s, 'first_row_tokens': tokens,
        'versions': {'jax': jax.__version__, 'additive_jax': aj.__version__}}

  def random_peft(self, model, seed: int) -> dict:
    """The methods' initial values, each moved by N(0, 0.02²): no zero B or up-projection,
    no all-ones scaling, so no method reduces to the identity and nothing is optimized away."""
    jax, jnp = self.jax, self.jax.numpy
    peft = model.init_peft(jax.random.key(seed), self.params)['peft']
    leaves, treedef = jax.tree.flatten(peft)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    moved = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
             if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)

  def build(self, variant: Variant, prompt_tokens: int) -> tuple:
    """(model, variables, adapter ids or None, prompts) for one variant."""
    aj, config = self.aj, self.config
    from additive_jax.peft.registry import parse_method

    prompts = prompt_ids(config.vocab_size, variant.batch, prompt_tokens)
    if variant.bf16_weights:
      bf16 = self.jax.numpy.bfloat16
      return (aj.Llama(config.replace(param_dtype=bf16)),
              {'params': self.jax.tree.map(lambda x: x.astype(bf16), self.params)}, None, prompts)
    if variant.method is None:
      return aj.Llama(config), {'params': self.params}, None, prompts
    model = aj.Llama(config, peft=(parse_method(variant.method),))
    if variant.stacked:  # different adapters (seeds), one per row
      adapters = [(model.peft, self.random_peft(model, seed)) for seed in range(variant.stacked)]
      methods, stacked = aj.peft.stack(adapters, config)
      adapter_ids = [row % variant.stacked for row in range(variant.batch)]
      return aj.Llama(config, peft=methods), {'params': self.params, 'peft': stacked}, \
          adapter_ids, prompts
    variables = {'params': self.params, 'peft': self.random_peft(model, 0)}
    if variant.merged:
      model, variables = aj.peft.merge(model, variables)
    return model, variables, None, prompts

  def decode(self, name: str) -> dict:
    from additive_jax.eval.decode import generate_ids

    model, variables, adapter_ids, prompts = self.built[name]
    stamps = []

    def on_tokens(row, tokens):  # called row by row each step: row 0 comes first
      if row == 0:
        stamps.append(time.perf_counter())
      return False  # never stop a row early

    started = time.perf_counter()
    out = generate_ids(model, variables, prompts, max_new_tokens=self.new_tokens, eos_ids=(),
                       adapter_ids=adapter_ids, on_tokens=on_tokens)
    return {**timing(started, stamps), 'tokens': out[0]}


class TheirsDecoder:
  """transformers' `LlamaForCausalLM.generate`: greedy, its KV cache, eager torch, fp32, on
  `device` ('cpu' or 'cuda'), the first `batch` rows of `prompt_ids` for each of `batches`."""

  def __init__(self, hf_dir, prompt_tokens, new_tokens, threads, device='cpu', batches=(1,)):
    import torch
    import transformers

    torch.set_num_threads(threads)  # as many as JAX's CPU client uses
    self.torch, self.new_tokens = torch, new_tokens
    self.model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # from_pretrained leaves the weights in the checkpoint's file mapping; this VM pages out
    # file pages left untouched for a minute (DAMON `pageout`), which a side idle between its
    # rounds would pay for by re-reading them. Ours holds its weights in anonymous memory, so
    # theirs gets a copy there too (tied weights stay one Parameter).
    with torch.no_grad():
      for tensor in list(self.model.parameters()) + list(self.model.buffers()):
        tensor.data = tensor.data.clone()
    self.model.to(device)
    prompts = prompt_ids(self.model.config.vocab_size, max(batches), prompt_tokens)
    self.prompts = torch.tensor(prompts, dtype=torch.long, device=device)
    warmup_s, tokens = {}, {}
    for batch in batches:  # row 0's prompt is the same at every batch
      started = time.perf_counter()
      tokens[batch] = self.decode('theirs', batch)['tokens']
      warmup_s[f'theirs_x{batch}' if batch > 1 else 'theirs'] = time.perf_counter() - started
    self.report = {
        'warmup_s': warmup_s, 'device': device,
        'first_row_tokens': {'theirs': tokens[batches[0]]},
        'torch_threads': torch.get_num_threads(),
        'attention': self.model.config._attn_implementation,
        'versions': {'torch': str(torch.__version__),  # str: torch's is a class of its own
                     'transformers': transformers.__version__}}

  def decode(self, name: str, batch: int = 1) -> dict:
    del name  # one variant: the base
    prompt, stamps = self.prompts[:batch], []

    class Stamps:  # generate's streamer: put() gets the prompt, then each new token
      def put(self, value):
        stamps.append(time.perf_counter())

      def end(self):
        pass

    started = time.perf_counter()
    out = self.model.generate(
        input_ids=prompt, attention_mask=self.torch.ones_like(prompt), do_sample=False,
        max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, use_cache=True,
        pad_token_id=0, streamer=Stamps())
    return {**timing(started, stamps[1:]), 'tokens': out[0, prompt.shape[1]:].tolist()}


def serve(conn, side: str, setup: dict) -> None:
  """Process entry: build `side` from `setup`, send its report, then answer `(method, args)`
  calls until 'finish'. A failure is sent back as a traceback."""
  try:
    worker = (OursDecoder if side == 'ours' else TheirsDecoder)(**setup)
    conn.send(('ok', worker.report))
    while True:
      name, args = conn.recv()
      if name == 'finish':
        conn.send(('ok', None))
        return
      conn.send(('ok', getattr(worker, name)(*args)))
  except Exception:  # the orchestrator re-raises it with the side named
    conn.send(('error', traceback.format_exc()))


class Side(side_process.Side):
  """A decoder side (`OursDecoder` if `kind` is 'ours', else `TheirsDecoder`) in its own
  process."""

  def __init__(self, label: str, kind: str, setup: dict):
    super().__init__(label, serve, kind, setup)
