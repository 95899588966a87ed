"""The two sides of benchmarks/train_throughput.py, each run in a process of its own.

`serve(conn, side, setup)` builds one side on the base checkpoint in
`setup['hf_dir']`, warms it up, measures its memory, then answers the
orchestrator's calls (`time_steps(n)`, `finish()`) over a `multiprocessing` pipe.
A process per side and per method keeps each side's memory its own (a peak is
never the other library's), and an idle side blocks on the pipe, so it takes no
CPU while the other is timed.

* `OursStep`: additive_jax's real trainer path: `create_train_state`, then
  `jit_train_step` on a one-device mesh (trainable state donated), AdamW from
  `make_optimizer` (global-norm clipping at 1.0, constant learning rate).
* `TheirsStep`: transformers `LlamaForCausalLM` + HF PEFT (`get_peft_model` with the
  config of the adapter ours exported with `save_adapter(format='hf_peft')`, then
  its values), so both sides start from the same values; `torch.optim.AdamW` on
  the trainable parameters, `clip_grad_norm_(1.0)`; bf16 through `torch.autocast`
  over fp32 weights.

Both compute the masked token cross-entropy of the same batches in fp32 and time
whole optimizer steps (forward, backward, clipping, update), synchronized; each
timed step takes the next of the batches, in turn. Ours computes the LM head at
the loss positions alone (its `loss_positions='auto'` budget, from these batches),
theirs at every position, as PEFT's users do. Packed rows reach theirs as a
block-diagonal 4-D causal mask with per-segment `position_ids`, so both compute the
same step; PEFT's prompt learning takes a 2-D mask only, so for prompt and prefix
tuning theirs sees each row as one sequence (other losses). Unpacked rows (one
segment each, as `--data=random`'s) reach theirs with its usual 2-D mask.

The base both read is an HF checkpoint directory: `write_random_checkpoint` draws one
of a config's shapes (seeded), for runs where the real weights cannot travel and
speed does not depend on them (train_throughput.py's `--random_weights`,
device_check.py).
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np


def write_hf_checkpoint(directory: str, config, tensors: dict) -> None:
  """`config.json` + `model.safetensors` (HF names and layouts), which both sides read."""
  from additive_jax.model.convert import config_to_hf
  from additive_jax.peft.files.file_io import write_json, write_tensors

  os.makedirs(directory, exist_ok=True)
  write_tensors(os.path.join(directory, 'model.safetensors'), tensors, {'format': 'pt'})
  write_json(os.path.join(directory, 'config.json'), config_to_hf(config))  # last: complete


def write_random_checkpoint(config, directory: str) -> None:
  """`config`'s shapes, weights ~ N(0, 0.02) and norms at one (seed 0)."""
  from additive_jax.model.convert import hf_tensor_shapes

  rng = np.random.default_rng(0)
  tensors = {name: np.ones(shape, np.float32) if name.endswith('norm.weight')
             else 0.02 * rng.standard_normal(shape, np.float32)
             for name, shape in hf_tensor_shapes(config).items()}
  write_hf_checkpoint(directory, config, tensors)


def random_batches(vocab_size: int, batch: int, seq_len: int,
                   segments: int = 1) -> list[dict[str, np.ndarray]]:
  """Random tokens, every target counted. segments=1: one unpadded row per example;
  more: each row packs that many sequences of random lengths, then padding (a sixth of
  the row: segment 0, no loss), positions restarting at each sequence."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
  segment_ids = np.ones((batch, seq_len), np.int32)
  if segments > 1:
    used = seq_len - seq_len // 6
    for row in segment_ids:
      cuts = np.sort(rng.choice(np.arange(1, used), segments - 1, replace=False))
      row[:] = np.searchsorted(cuts, np.arange(seq_len), side='right') + 1
      row[used:] = 0
  slot = np.arange(seq_len)
  starts = np.where(np.diff(segment_ids, prepend=-1, axis=1) != 0, slot, 0)
  positions = slot - np.maximum.accumulate(starts, axis=1)  # since the row's last new segment
  return [{'tokens': ids[:, :-1], 'targets': ids[:, 1:],
           'loss_mask': (segment_ids != 0).astype(np.float32),
           'positions': positions.astype(np.int32), 'segment_ids': segment_ids}]


def most_loss_positions(batches) -> int:
  return int(max(np.max(np.sum(b['loss_mask'] != 0, axis=1)) for b in batches))


class OursStep:
  """additive_jax: one method on the frozen base, the jitted train step compiled ahead."""

  def __init__(self, hf_dir, method, batches, dtype, warmup, adapter_dir=None, attention='auto'):
    import jax
    import jax.numpy as jnp

    import additive_jax as aj
    from additive_jax.peft.registry import parse_method
    from additive_jax.train.config import RULES
    from additive_jax.train.flops import peak_flops, train_step_flops
    from additive_jax.train.loss_budget import budget_for
    from additive_jax.train.mesh import batch_sharding, make_mesh, replicated
    from additive_jax.train.model_state import create_train_state
    from additive_jax.train.optimizer import make_optimizer, method_settings
    from additive_jax.train.step import jit_train_step

    self.jax = jax
    platform = jax.default_backend()
    dtype = dtype if dtype != 'auto' else ('float32' if platform == 'cpu' else 'bfloat16')
    config, host_params = aj.load_model(hf_dir, attention=attention)
    if dtype == 'bfloat16':  # bf16 compute; base weights, trainables and Adam stay fp32
      config = config.replace(dtype=jnp.bfloat16)
    peft_method = parse_method(method)
    model = aj.Llama(config, peft=(peft_method,))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    self.params = jax.device_put(host_params, replicated(mesh))
    settings = method_settings(type(peft_method), {'schedule': 'constant'})
    learning_rate = settings['learning_rate']
    optimizer = make_optimizer([peft_method.key], {peft_method.key: settings}, total_steps=1)
    self.state, state_shardings = create_train_state(model, self.params, optimizer,
                                                     jax.random.key(0), mesh)
    if adapter_dir:
      aj.peft.save_adapter(adapter_dir, model.peft, self.state.peft, config, format='hf_peft')
    self.batches = [jax.device_put(b, batch_sharding(mesh)) for b in batches]
    self.turn = 0
    rows, seq_len = batches[0]['tokens'].shape
    budget = budget_for(most_loss_positions(batches), seq_len)
    step = jit_train_step(model, optimizer, 1, mesh, RULES, state_shardings, replicated(mesh),
                          budget)
    started = time.perf_counter()
    self.step = step.lower(self.state, self.params, self.batches[0]).compile()
    compile_s = time.perf_counter() - started
    analysis = self.step.memory_analysis()
    step_bytes = {'argument': analysis.argument_size_in_bytes,
                  'output': analysis.output_size_in_bytes,
                  'alias': analysis.alias_size_in_bytes,
                  'temp': analysis.temp_size_in_bytes}
    step_bytes['total'] = (step_bytes['argument'] + step_bytes['output'] - step_bytes['alias']
                           + step_bytes['temp'])
    losses, warmup_s = [], []
    for _ in range(warmup):
      warmup_s += self.time_steps(1)
      losses.append(float(self.metrics['loss']))
    self.report = {
        'platform': platform, 'device': jax.devices()[0].device_kind, 'dtype': dtype,
        'method': peft_method.call_string(), 'attention': attention,
        'learning_rate': learning_rate,
        'trainable_params': sum(x.size for x in jax.tree.leaves(self.state.peft)),
        'compile_s': compile_s, 'warmup_step_s': warmup_s, 'warmup_losses': losses,
        'compiled_step_bytes': step_bytes, 'loss_positions_budget': budget,
        'step_flops': train_step_flops(config, (peft_method,), rows=rows, seq_len=seq_len,
                                       logit_positions=rows * (budget or seq_len)),
        'peak_flops': peak_flops(jax.devices()[0].device_kind, dtype),
        'loss_fraction': float(np.mean([np.mean(b['loss_mask'] != 0) for b in batches])),
        'versions': {'jax': jax.__version__, 'additive_jax': aj.__version__}}

  def time_steps(self, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
      batch = self.batches[self.turn % len(self.batches)]
      self.turn += 1
      started = time.perf_counter()
      self.state, self.metrics = self.step(self.state, self.params, batch)
      self.jax.block_until_ready((self.state, self.metrics))
      seconds.append(time.perf_counter() - started)
    return seconds

  def finish(self) -> dict:
    """The allocator's peak over this process (an accelerator; the CPU client keeps none)."""
    stats = self.jax.devices()[0].memory_stats() or {}
    return {'peak_bytes_in_use': stats.get('peak_bytes_in_use')}


class TheirsStep:
  """transformers + HF PEFT: the adapter ours exported, trained with torch's AdamW."""

  def __init__(self, hf_dir, adapter_dir, batches, dtype, warmup, device, threads,
               learning_rate):
    import peft
    import safetensors.torch
    import torch
    import transformers

    self.torch = torch
    if device == 'cpu':
      torch.set_num_threads(threads)
    else:
      torch.cuda.reset_peak_memory_stats()
    self.device = device
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    # PEFT loads a prompt-learning adapter only frozen, so: its config, then its values
    settings = peft.PeftConfig.from_pretrained(adapter_dir)
    settings.inference_mode = False
    self.model = peft.get_peft_model(base, settings)
    values = safetensors.torch.load_file(os.path.join(adapter_dir, 'adapter_model.safetensors'))
    peft.set_peft_model_state_dict(self.model, values)  # the step-1 losses show it took them
    self.model.train()
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.trainable, lr=learning_rate, weight_decay=0.0)
    self.autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')
    # rows of one segment each need no 4-D mask: PEFT then runs its usual causal attention
    packed = any(len(np.unique(b['segment_ids'])) > 1 for b in batches)
    self.packed_mask = packed and settings.peft_type not in ('PROMPT_TUNING', 'PREFIX_TUNING')
    self.batches = [self.torch_batch(b) for b in batches]
    self.batch, self.turn = self.batches[0], 0
    losses, warmup_s = [], []
    for _ in range(warmup):
      warmup_s += self.time_steps(1)
      losses.append(self.loss.item())
    self.report = {
        'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
        'torch_threads': torch.get_num_threads(), 'dtype': dtype,
        'autocast_bf16': dtype == 'bfloat16',
        'attention': base.config._attn_implementation,
        'trainable_params': sum(p.numel() for p in self.trainable),
        'warmup_step_s': warmup_s, 'warmup_losses': losses,
        'versions': {'torch': str(torch.__version__), 'transformers': transformers.__version__,
                     'peft': peft.__version__}}  # str: torch's is a class the parent would import
    if device == 'cpu':
      self.report['profiled_step_bytes'] = self.profile_step_bytes()

  def torch_batch(self, arrays) -> dict:
    """The batch on the device; packed rows as a block-diagonal causal mask [B, 1, T, T]."""
    torch = self.torch
    batch = {name: torch.from_numpy(np.asarray(arrays[name])).to(self.device)
             for name in ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')}
    batch['tokens'], batch['targets'] = batch['tokens'].long(), batch['targets'].long()
    tokens, segments = batch['tokens'], batch['segment_ids']
    if self.packed_mask:
      causal = torch.tril(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool,
                                     device=self.device))
      batch['mask'] = (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]
      batch['position_ids'] = batch['positions'].long()
    else:
      batch['mask'], batch['position_ids'] = torch.ones_like(tokens), None
    return batch

  def train_step(self):
    torch = self.torch
    tokens, targets, mask = self.batch['tokens'], self.batch['targets'], self.batch['loss_mask']
    with self.autocast():
      logits = self.model(input_ids=tokens, attention_mask=self.batch['mask'],
                          position_ids=self.batch['position_ids'], use_cache=False).logits
    logits = logits[:, -tokens.shape[1]:]  # prompt tuning returns the virtual positions too
    token_loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   reduction='none')
    self.loss = (token_loss * mask.flatten()).sum() / mask.sum()
    self.loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)

  def time_steps(self, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
      self.batch = self.batches[self.turn % len(self.batches)]
      self.turn += 1
      started = time.perf_counter()
      self.train_step()
      if self.device == 'cuda':
        self.torch.cuda.synchronize()
      seconds.append(time.perf_counter() - started)
    return seconds

  def profile_step_bytes(self) -> dict:
    """Bytes of tensors alive at one step's peak: those alive before it (weights, Adam
    moments, batch) plus the largest rise of the allocation timeline during it, read
    from every allocation and free torch's profiler records on the CPU."""
    torch = self.torch
    tensors = list(self.model.parameters()) + list(self.model.buffers())
    tensors += [t for t in self.batch.values() if torch.is_tensor(t)]
    tensors += [t for state in self.optimizer.state.values() for t in state.values()
                if torch.is_tensor(t)]
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                  for t in tensors}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
      self.train_step()
    changes = sorted((event.start_ns(), event.nbytes())
                     for event in profiler.profiler.kineto_results.events()
                     if event.name() == '[memory]')
    live = peak_rise = 0
    for _, nbytes in changes:
      live += nbytes
      peak_rise = max(peak_rise, live)
    return {'before_step': before, 'peak_rise': peak_rise, 'total': before + peak_rise}

  def finish(self) -> dict:
    if self.device != 'cuda':
      return {}
    return {'max_memory_allocated': self.torch.cuda.max_memory_allocated()}


def serve(conn, side: str, setup: dict) -> None:
  """Process entry: build `side` ('ours' or 'theirs') from `setup`, send its report, then
  answer `(method name, args)` calls until 'finish'. A failure is sent back as a traceback."""
  try:
    worker = (OursStep if side == 'ours' else TheirsStep)(**setup)
    conn.send(('ok', worker.report))
    while True:
      name, args = conn.recv()
      conn.send(('ok', getattr(worker, name)(*args)))
      if name == 'finish':
        return
  except Exception:  # the orchestrator re-raises it with the side named
    conn.send(('error', traceback.format_exc()))
