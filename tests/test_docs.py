"""The README and the docs: the README stays a landing page, every relative link in the Markdown
pages resolves (to a file, and to a heading for an `#anchor`), the Layout names every module,
and the README's Python code runs as written, on a tiny random model in place of the embedded
default."""

import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
README_MAX_LINES = 300
# The pages whose ```python blocks run, in order, in one namespace: the README's, then the
# docs pages that go on from it.
SNIPPET_PAGES = ('README.md', 'docs/generating.md')
DEFAULT_MODEL = "'smollm2-135m-instruct'"

FENCE = re.compile(r'^(```|~~~)')
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HTML_ANCHOR = re.compile(r'<a\s+(?:name|id)="([^"]+)"')


def markdown_pages() -> list[Path]:
  pages = [README]
  for folder in ('docs', 'benchmarks', 'experiments'):
    pages += sorted((ROOT / folder).rglob('*.md'))
  return pages


def prose_lines(text: str):
  """(line number, line) of the lines outside fenced code blocks."""
  fenced = False
  for number, line in enumerate(text.split('\n'), start=1):
    if FENCE.match(line.lstrip()):
      fenced = not fenced
      continue
    if not fenced:
      yield number, line


def without_code_spans(line: str) -> str:
  return re.sub(r'(`+)(?:(?!\1).)+?\1', '', line)


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: its text (code spans and link texts kept, markup
  dropped), lower case, every character but letters, marks, digits, '_', '-' and spaces
  removed, spaces turned into '-'."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link: its text
  text = re.sub(r'<[^>]+>', '', text).replace('`', '').lower()
  kept = ''.join(c for c in text if c in ' -_' or unicodedata.category(c)[0] in 'LM'
                 or unicodedata.category(c) in ('Nd', 'Nl'))
  return kept.replace(' ', '-')


def anchors(page: Path) -> set[str]:
  """Every anchor of a page: its headings' slugs (a repeated one numbered as GitHub does) and
  its explicit `<a name|id="…">`."""
  found, seen = set(), {}
  text = page.read_text(encoding='utf-8')
  for _, line in prose_lines(text):
    heading = re.match(r'^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$', line)
    if heading:
      slug = github_slug(heading.group(1))
      found.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
      seen[slug] = seen.get(slug, 0) + 1
    found.update(HTML_ANCHOR.findall(line))
  return found


def relative_links(page: Path):
  """(line number, target) of each relative link and image of a page, outside code."""
  for number, line in prose_lines(page.read_text(encoding='utf-8')):
    for target in LINK.findall(without_code_spans(line)):
      if not re.match(r'^[a-z][a-z0-9+.-]*:', target, re.IGNORECASE):  # no http:, mailto:, …
        yield number, target


def broken_links(page: Path) -> list[str]:
  broken = []
  for number, target in relative_links(page):
    path, _, anchor = target.partition('#')
    resolved = (page.parent / path).resolve() if path else page
    where = f'{page.relative_to(ROOT)}:{number}: ({target})'
    if not resolved.exists():
      broken.append(f'{where} no such file')
    elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
      broken.append(f'{where} no heading with the anchor #{anchor} in '
                    f'{resolved.relative_to(ROOT)}')
  return broken


def python_blocks(page: Path) -> list[str]:
  blocks, block = [], None
  for line in page.read_text(encoding='utf-8').split('\n'):
    if block is None and re.match(r'^```python\s*$', line):
      block = []
    elif block is not None and line.startswith('```'):
      blocks.append('\n'.join(block))
      block = None
    elif block is not None:
      block.append(line)
  return blocks


def test_the_readme_is_a_landing_page():
  lines = README.read_text(encoding='utf-8').count('\n')  # what `wc -l` counts
  assert lines <= README_MAX_LINES, (
      f'README.md has {lines} lines, more than {README_MAX_LINES}: move detail to docs/')


def test_the_readme_test_command_is_the_one_ci_runs():
  ci = ROOT / '.ci' / 'run'
  if not ci.exists():
    pytest.skip('no .ci/run in this checkout')
  command = ci.read_text(encoding='utf-8').strip().split('\n')[-1]
  assert command in README.read_text(encoding='utf-8')


@pytest.mark.parametrize('page', markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
  assert not broken_links(page), '\n'.join(broken_links(page))


def test_the_slugs_are_githubs():
  assert github_slug('No logits where no loss is taken') == 'no-logits-where-no-loss-is-taken'
  assert github_slug('Decoding, ours against transformers') == 'decoding-ours-against-transformers'
  assert github_slug('GSM8K: exact match after a short CPU run') == (
      'gsm8k-exact-match-after-a-short-cpu-run')
  assert github_slug('Reading rows (for metrics)') == 'reading-rows-for-metrics'
  assert github_slug('`aj.peft` and (IA)³') == 'ajpeft-and-ia'


def test_the_layout_names_every_module():
  """Each module under additive_jax/ is named in the README's Layout, in its folder's entry."""
  text = README.read_text(encoding='utf-8')
  layout = text[text.index('## Layout'):]
  layout = layout[layout.index('```') + 3:]
  layout = layout[:layout.index('```')]
  entries, folder = {}, None
  for line in layout.split('\n'):
    label = re.match(r'^ {0,2}([a-z_/]+/)\s', line + ' ')
    if label:
      folder = label.group(1)
    if folder:
      entries[folder] = entries.get(folder, '') + line[len(label.group(0)) if label else 0:]
  missing = []
  for module in sorted((ROOT / 'additive_jax').rglob('*.py')):
    relative = module.relative_to(ROOT / 'additive_jax')
    if module.name == '__init__.py' and relative.parent != Path('.'):
      continue  # a package's marker
    folder = 'additive_jax/' if relative.parent == Path('.') else f'{relative.parent.as_posix()}/'
    if not re.search(rf'(?<![\w/]){re.escape(module.name)}', entries.get(folder, '')):
      missing.append(f'additive_jax/{relative.as_posix()}')
  assert not missing, f"the README's Layout does not name {missing}"


def write_tiny_model(directory: Path) -> None:
  """A random 2-layer Llama as an HF checkpoint, with a byte-level BPE tokenizer of its own
  (no download: the embedded default is a 538 MB model)."""
  import safetensors.numpy
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  import transformers

  from additive_jax.model.config import LlamaConfig
  from additive_jax.model.convert import config_to_hf, hf_tensor_shapes

  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(['Review: a fine film\nSentiment: positive'], trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, eos_token='<|endoftext|>', pad_token='<|endoftext|>')
  tokenizer.save_pretrained(directory)
  config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24, rms_norm_eps=1e-5)
  (directory / 'config.json').write_text(json.dumps(config_to_hf(config)))
  rng = np.random.default_rng(0)
  safetensors.numpy.save_file(
      {name: (0.05 * rng.standard_normal(shape)).astype(np.float32)
       for name, shape in hf_tensor_shapes(config).items()}, str(directory / 'model.safetensors'))


def test_the_readme_python_runs(tmp_path, monkeypatch):
  """The README's Python blocks, then those of the pages that go on from it, run as written
  in one namespace; only the embedded default's name is replaced by the tiny model's path."""
  model_dir = tmp_path / 'tiny'
  model_dir.mkdir()
  write_tiny_model(model_dir)
  monkeypatch.chdir(tmp_path)  # the code writes out/adapter
  namespace = {}
  for page in SNIPPET_PAGES:
    blocks = python_blocks(ROOT / page)
    assert blocks, f'{page} has no ```python block'
    code = '\n\n'.join(blocks)
    if page == 'README.md':
      assert DEFAULT_MODEL in code, f'the README code no longer loads {DEFAULT_MODEL}'
    code = code.replace(DEFAULT_MODEL, repr(str(model_dir)))
    exec(compile(code, str(ROOT / page), 'exec'), namespace)  # noqa: S102
  assert namespace['logits'].shape == (*namespace['tokens'].shape, namespace['config'].vocab_size)
  assert all(isinstance(text, str) for text in namespace['texts'])
  assert os.path.exists(tmp_path / 'out' / 'adapter')
