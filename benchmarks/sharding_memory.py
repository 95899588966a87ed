"""Per-device memory of a run on a mesh: the frozen base, the trainable state, one step.

    .venv/bin/python benchmarks/sharding_memory.py [--model=smollm2-135m-instruct] [--method="LoRA()"]

Runs on 8 host CPU devices (XLA's fake devices on a CPU machine) and,
for each mesh, reports the bytes device 0 holds of the base (its shards), of the
trainable state (replicated), the optimizer-state / trainable-bytes ratio (2.0
for Adam: two moments a leaf, nothing for the base), and the compiled train
step's own memory per device (`compiled.memory_analysis()`: temporaries,
arguments, outputs), and the fsdp-8 step once more with the weights' rules alone (no
activation constraint), for comparison. Writes benchmarks/results/sharding_memory.json.
"""

from __future__ import annotations

import json
import os

# Eight host devices; XLA reads the flag when JAX starts its backend.
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import additive_jax as aj  # noqa: E402
from additive_jax import command  # noqa: E402
from additive_jax.model.llama import Llama  # noqa: E402
from additive_jax.peft.registry import parse_method  # noqa: E402
from additive_jax.train.config import RULES  # noqa: E402
from additive_jax.model.load import place  # noqa: E402
from additive_jax.train.mesh import make_mesh  # noqa: E402
from additive_jax.train.model_state import base_shardings, create_train_state  # noqa: E402
from additive_jax.train.optimizer import make_optimizer, method_settings  # noqa: E402
from additive_jax.train.step import jit_train_step  # noqa: E402

_MODEL = flags.DEFINE_string('model', 'smollm2-135m-instruct', 'HF directory, .gguf or embedded name')
_METHOD = flags.DEFINE_string('method', 'LoRA(rank=8, alpha=16)', 'the method trained')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per step')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'tokens per row')
_OUT = flags.DEFINE_string('out', os.path.join(os.path.dirname(__file__), 'results',
                                               'sharding_memory.json'), 'JSON results')
# The weights' rules alone: the model's activation constraints then name no mesh axis.
WEIGHT_RULES = tuple(rule for rule in RULES if not rule[0].startswith('activation_'))
MESHES = {'1 device': ((1, 1, 1), RULES), 'data 8': ((8, 1, 1), RULES), 'fsdp 8': ((1, 8, 1), RULES),
          'fsdp 4 x tensor 2': ((1, 4, 2), RULES),
          'fsdp 8, no activation rules': ((1, 8, 1), WEIGHT_RULES)}


def device0_bytes(tree) -> int:
  """Bytes of `tree`'s shards on the first device of its mesh."""
  device = jax.tree.leaves(tree)[0].sharding.mesh.devices.flat[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def measure(mesh_shape, rules, host_params, config, method_text):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = make_mesh(mesh_shape, devices=devices)
  shardings, fallback = base_shardings(config, mesh, rules)
  params = place(host_params, shardings)
  method = parse_method(method_text)
  model = Llama(config, peft=(method,))
  optimizer = make_optimizer([method.key], {method.key: method_settings(type(method))}, 10)
  state, state_shardings = create_train_state(model, params, optimizer, jax.random.key(0), mesh)
  batch = {name: jax.ShapeDtypeStruct((_BATCH.value, _SEQ.value), dtype) for name, dtype in
           (('tokens', np.int32), ('targets', np.int32), ('loss_mask', np.float32),
            ('positions', np.int32), ('segment_ids', np.int32))}
  step = jit_train_step(model, optimizer, 1, mesh, rules, state_shardings, shardings)
  analysis = step.lower(state, params, batch).compile().memory_analysis()
  trainable = sum(x.nbytes for x in jax.tree.leaves(state.peft))
  moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim)
  return {'base_bytes_device0': device0_bytes(params),
          'base_bytes_total': sum(x.nbytes for x in jax.tree.leaves(params)),
          'replicated_instead': [f'{path} axis {dim}' for path, dim, _, _ in fallback],
          'trainable_bytes': trainable, 'optimizer_state_bytes': moments,
          'optimizer_over_trainable': moments / trainable,
          'step_temp_bytes': analysis.temp_size_in_bytes,
          'step_argument_bytes': analysis.argument_size_in_bytes,
          'step_output_bytes': analysis.output_size_in_bytes}


def main(argv):
  del argv
  config, host_params = aj.load_model(_MODEL.value)
  results = {name: measure(shape, rules, host_params, config, _METHOD.value)
             for name, (shape, rules) in MESHES.items()}
  mib = lambda n: f'{n / 2**20:9.1f}'
  print(f'{_MODEL.value}, {_METHOD.value}, step {_BATCH.value}x{_SEQ.value}; MiB per device:')
  print(f'{"mesh":<28} {"base":>9} {"trainable":>9} {"opt/train":>9} {"step temp":>9} {"step args":>9}')
  for name, r in results.items():
    print(f'{name:<28} {mib(r["base_bytes_device0"])} {mib(r["trainable_bytes"])} '
          f'{r["optimizer_over_trainable"]:9.4f} {mib(r["step_temp_bytes"])} {mib(r["step_argument_bytes"])}')
  ratio = results['1 device']['base_bytes_device0'] / results['fsdp 8']['base_bytes_device0']
  print(f'base bytes per device, 1 device / fsdp 8: {ratio:.2f}x')
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump({'model': _MODEL.value, 'method': _METHOD.value, 'batch': _BATCH.value,
               'seq_len': _SEQ.value, 'meshes': results, 'base_ratio_1_over_fsdp8': ratio}, f, indent=2)


if __name__ == '__main__':
  command.run(main)
