"""additive_jax: additive parameter-efficient fine-tuning of Llama models in JAX/Flax.

    import additive_jax as aj
    config, params = aj.load_model('smollm2-135m-instruct')
    tokenizer = aj.load_tokenizer('smollm2-135m-instruct')
    model = aj.Llama(config, peft=(aj.peft.IA3(),))
    variables = model.init_peft(jax.random.key(0), params)
    logits = model.apply(variables, tokens)

The names below are imported when first used (PEP 562), so `import additive_jax`
loads neither JAX nor a model, and a command imports only the layers it needs.
"""

import importlib
import importlib.metadata

__version__ = importlib.metadata.version('additive_jax')

# public name -> the module that defines it
_PUBLIC = {'peft': 'additive_jax.peft',
           'LlamaConfig': 'additive_jax.model.config',
           'KVCache': 'additive_jax.model.kv_cache',
           'Llama': 'additive_jax.model.llama',
           'load_model': 'additive_jax.model.load',
           'load_tokenizer': 'additive_jax.model.tokenizer',
           'generate': 'additive_jax.eval.decode',
           'Sampling': 'additive_jax.eval.sampling',
           'restore_run': 'additive_jax.train.restore',
           'train_and_evaluate': 'additive_jax.train.loop'}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(_PUBLIC[name])
  return module if name == 'peft' else getattr(module, name)
