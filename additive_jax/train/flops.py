"""Model FLOPs of a train step and model FLOPs utilization (MFU).

A step trains adapters on a frozen base, so it costs less than pre-training's 6N
per token. Per row of T tokens (T counts prompt-tuning vectors, which run through
every layer like tokens), with N_body the matrix parameters of the layers:

  forward       2·N_body·T + attention
  backward      2·N_body·T + 2·attention   activation gradients only: the base has no weight
                                           gradients; none at all when no method acts inside
                                           the backbone (ladder side tuning)
  adapters      6·A·T                      A: trainable weights every token multiplies
                                           (`Method.token_matmul_params`): 2 forward, 2 for
                                           the activation gradient, 2 for the weight gradient
  LM head       4·D·V per position whose logits are computed (forward and its activation
                gradient): only the loss positions when the step gathers them
                (`train/loss.py`), so skipping logits cannot inflate MFU
  attention     4·L·N·H per (query, visible key) pair: QKᵀ and PV; causal, so query t of a
                row sees t + 1 keys, plus the prefix slots

MFU = model FLOPs / (step time · devices · peak FLOP/s of one device). The peak is
the datasheet's dense figure for the compute dtype (`PEAK_TFLOPS`, matched against
`jax.Device.device_kind`), or `config.peak_tflops` where set; a CPU has no entry,
so on a CPU only the achieved FLOP/s is logged unless a peak is given.
"""

from __future__ import annotations

from typing import Sequence

from additive_jax.model.config import LlamaConfig

# (device_kind prefix, compute dtype) -> dense peak TFLOP/s of one device (datasheets; fp32
# matrix products run as TF32 on NVIDIA tensor cores at JAX's default precision).
PEAK_TFLOPS = {
    ('NVIDIA H200', 'bfloat16'): 989.0, ('NVIDIA H200', 'float32'): 494.0,
    ('NVIDIA H100', 'bfloat16'): 989.0, ('NVIDIA H100', 'float32'): 494.0,
    ('NVIDIA A100', 'bfloat16'): 312.0, ('NVIDIA A100', 'float32'): 156.0,
    ('NVIDIA L4', 'bfloat16'): 121.0, ('NVIDIA L4', 'float32'): 60.0,
    ('TPU v4', 'bfloat16'): 275.0,
    ('TPU v5 lite', 'bfloat16'): 197.0, ('TPU v5e', 'bfloat16'): 197.0,
    ('TPU v5p', 'bfloat16'): 459.0, ('TPU v5', 'bfloat16'): 459.0,
    ('TPU v6 lite', 'bfloat16'): 918.0, ('TPU v6e', 'bfloat16'): 918.0,
}


def peak_flops(device_kind: str, dtype: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override if positive, else the table's longest matching
  device kind (a TPU's fp32 products run in bf16 passes: its bf16 figure), else None."""
  if override_tflops > 0:
    return override_tflops * 1e12
  matches = [(kind, peak) for (kind, kind_dtype), peak in PEAK_TFLOPS.items()
             if device_kind.startswith(kind) and kind_dtype == dtype]
  if not matches and device_kind.startswith('TPU'):
    matches = [(kind, peak) for (kind, kind_dtype), peak in PEAK_TFLOPS.items()
               if device_kind.startswith(kind) and kind_dtype == 'bfloat16']
  if not matches:
    return None
  return max(matches, key=lambda match: len(match[0]))[1] * 1e12


def body_matrix_params(config: LlamaConfig) -> int:
  """Weights of the layers' matrix products: q, k, v, o, gate, up, down."""
  d, nh, kh = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return config.num_layers * (2 * d * nh + 2 * d * kh + 3 * d * config.intermediate_size)


def attention_flops(config: LlamaConfig, length: int, prefix: int) -> float:
  """Forward attention FLOPs of one row of `length` query positions (causal) and `prefix`
  key/value slots every position sees."""
  pairs = length * (length + 1) / 2 + length * prefix
  return 4.0 * config.num_layers * config.num_heads * config.head_dim * pairs


def train_step_flops(config: LlamaConfig, methods: Sequence, *, rows: int, seq_len: int,
                     logit_positions: float) -> float:
  """Model FLOPs of one optimizer step over `rows` rows of `seq_len` tokens, the LM head
  applied at `logit_positions` positions in all."""
  length = seq_len + sum(m.num_virtual_tokens for m in methods)
  prefix = sum(m.num_prefix_tokens for m in methods)
  backbone_backward = any(m.acts_in_backbone for m in methods)
  body = 2.0 * body_matrix_params(config) * length
  attention = attention_flops(config, length, prefix)
  per_row = body + attention
  if backbone_backward:
    per_row += body + 2 * attention
  per_row += 6.0 * sum(m.token_matmul_params(config) for m in methods) * length
  head = 4.0 * config.hidden_size * config.vocab_size * logit_positions
  return rows * per_row + head


def logit_positions(rows: int, seq_len: int, budget: int | None, accumulation: int,
                    overflowed: int) -> int:
  """Positions whose logits one step computed: `budget` a row, or every position of the
  `overflowed` micro-batches (and of all, without a budget)."""
  if budget is None:
    return rows * seq_len
  return rows * budget + overflowed * (rows // accumulation) * (seq_len - budget)
