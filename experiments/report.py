r"""The tables, plot and paired comparisons of a finished (or partly finished) sweep.

    python -m experiments.report ROOT [--out=PREFIX] [--pair=A,B ...]
    python -m experiments.report runs/small --out=experiments/results/small --pair=A,B

reads `ROOT/sweep.json` (experiments/sweep.py writes it) and each done point's
`summary.json` and `test_hits.json`; writes `PREFIX.md` (printed too), `PREFIX.json` (the
same numbers) and `PREFIX.png` (the test metric against trainable parameters), a table and
a panel per task (the data source and split a run's test hits name, else its base config); PREFIX defaults to `ROOT/report`; paths go through epath.

A *setting* is a point's base config, its argument without `runlocal` and its overrides
without `seed`; its points are its seeds, one row (metric mean ± std with ddof=1, median
tokens/s, largest memory). Its *name* is the point name without its seed part, e.g.
`pfeiffer_dim=16` (the table's last column); `--pair` takes a name, or the start of one up
to a `_` that no other name starts with.

The zero-shot base is the mean `<metric>_before` of the points whose methods all start as
the identity (a zero adapter up-projection or LoRA B, unit (IA)³ scales): their "before" is
the base model's; prompt, prefix and ladder tuning change the output before training.

`--pair=A,B` compares two settings on the same test rows: a row's outcome on a side is
its hits averaged over that side's seeds, the statistic is the mean over rows of A's minus
B's outcome (the metric difference A − B), and its 95% interval the 2.5th and 97.5th
percentiles of that mean over 10,000 resamples of the rows (with replacement, numpy seed
0). Resampling rows asks how much the difference depends on which test rows were drawn;
seeds enter only through the averaging. Hits of other lengths, splits or limits are refused.
"""

from __future__ import annotations

import io
import json
import re
import statistics

from absl import app, flags
from etils import epath
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from additive_jax import command  # noqa: E402
from additive_jax.peft.lora import TARGETS as LORA_TARGETS  # noqa: E402
from additive_jax.peft.registry import combinations, field_types, presets  # noqa: E402
from additive_jax.eval.metrics import METRICS  # noqa: E402
from additive_jax.train.config import TASKS  # noqa: E402
from additive_jax.train.workdir import RunFolder  # noqa: E402
from experiments.bootstrap import BOOTSTRAP_SEED, RESAMPLES, compare  # noqa: E402

SEED_KEY = 'seed'
# keys that vary from run to run of one setting without changing what it trains: a seed's
# runs are one setting whatever these say (a study scores its zero-shot base in seed 0 alone)
PER_RUN_KEYS = (SEED_KEY, 'test_before')
LOCAL_WORD = 'runlocal'  # shrinks a run; the same setting otherwise
IDENTITY_AT_INIT = ('pfeiffer', 'houlsby', 'parallel', 'lora', 'ia3')
FAMILY_ORDER = ('pfeiffer', 'houlsby', 'parallel', 'lora', 'ia3', 'prompt', 'prefix', 'ladder')
MiB = 1 << 20
# the method fields a label shows (the rest of a method's overrides go to the settings column)
SHOWN_FIELDS = {'bottleneck': ('placement', 'dim', 'reduction_factor'),
                'lora': ('rank', 'alpha', 'targets'), 'prompt': ('num_tokens',),
                'prefix': ('num_tokens',), 'ladder': ('reduction',),
                'compacter': ('placement', 'reduction_factor'), 'reft': ('kind', 'rank')}
# the combinations (peft/combinations.py) by the names their papers give them
COMBINATION_NAMES = {'mam': 'MAM adapter', 'unipelt': 'UniPELT'}
PLACEMENT_NAMES = {'pfeiffer': 'Pfeiffer adapter', 'houlsby': 'Houlsby adapter',
                   'parallel': 'parallel adapter'}
MEMORY_HEADERS = {('peak',): 'peak memory MiB', ('compiled',): 'step memory MiB'}  # else mixed
MEMORY_NOTE = ("Memory: the device allocator's peak (`device_peak_bytes`) where every seed "
               "reported one, else the compiled train step's (`step_memory_bytes`; marked c in a "
               'column of both), the largest over the seeds that trained a step (a run resumed '
               'after its last step measures neither speed nor memory).')


def read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text(encoding='utf-8'))


def number(value) -> str:
  """3e-3 rather than 0.003: learning rates read as their exponent."""
  if isinstance(value, float) and value and not 1e-2 <= abs(value) < 1e4:
    mantissa, exponent = f'{value:.2e}'.split('e')
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
  if isinstance(value, (list, tuple)):
    return ','.join(map(str, value))
  return f'{value:g}' if isinstance(value, float) else str(value)


def method_words(arg: str | None) -> tuple[str, ...]:
  return tuple(w for w in (arg or '').split(',') if w and w != LOCAL_WORD)


def describe(words: tuple[str, ...], overrides: dict) -> tuple[str, str, dict]:
  """(label, family, the overrides the label leaves to the settings column). The label names
  each method with its size, `LoRA r 4 (all 7)`; the family is the label without the size."""
  known = presets()
  if len(words) == 1 and words[0] in combinations():  # a named combination: its name
    name = COMBINATION_NAMES.get(words[0], words[0])
    return name, name, dict(overrides)
  if not words or any(w not in known for w in words):
    text = ','.join(words) or 'base config'
    return text, text, dict(overrides)
  rest, labels, families = dict(overrides), [], []
  for word in words:
    cls, chosen = known[word]
    fields = {**{name: default for name, (default, _) in field_types(cls).items()}, **chosen}
    prefix = f'peft.{cls.key}.'
    for key in [k for k in rest if k.startswith(prefix)
                and k.removeprefix(prefix) in SHOWN_FIELDS.get(cls.key, ())]:
      fields[key.removeprefix(prefix)] = rest.pop(key)
    family, label = method_text(cls.key, fields, chosen)
    families, labels = families + [family], labels + [label]
  return ' + '.join(labels), ' + '.join(families), rest


def method_text(key: str, fields: dict, preset: dict) -> tuple[str, str]:
  """(family, label) of one method from its fields."""
  if key == 'bottleneck':
    name = PLACEMENT_NAMES.get(fields['placement'], f"{fields['placement']} adapter")
    factor = fields.get('reduction_factor')
    size = f'reduction {number(factor)}' if factor else f"dim {fields['dim']}"
    return name, f'{name} {size}'
  if key == 'lora':
    targets = fields['targets']
    targets = targets.split(',') if isinstance(targets, str) else targets
    where = 'all 7' if set(targets) == set(LORA_TARGETS) else ','.join(targets)
    # alpha is shown only off the preset's alpha/rank ratio, which sweeps keep (alpha = 2·rank)
    off_ratio = fields['alpha'] / fields['rank'] != preset['alpha'] / preset['rank']
    alpha = f" α {number(fields['alpha'])}" if off_ratio else ''
    return f'LoRA ({where})', f"LoRA r {fields['rank']}{alpha} ({where})"
  if key == 'ia3':
    return '(IA)³', '(IA)³'
  if key in ('prompt', 'prefix'):
    return f'{key} tuning', f"{key} tuning {fields['num_tokens']} tokens"
  if key == 'ladder':
    return 'ladder side tuning', f"ladder side tuning reduction {fields['reduction']}"
  if key == 'compacter':
    name = {'houlsby': 'Compacter', 'pfeiffer': 'Compacter++'}.get(
        fields['placement'], f"Compacter ({fields['placement']})")
    return name, f"{name} reduction {number(fields['reduction_factor'])}"
  if key == 'ptuning':
    encoder = f"{fields['encoder'].upper()} {fields['encoder_hidden'] or 'D'}"
    return 'P-tuning', f"P-tuning {fields['num_tokens']} tokens ({encoder})"
  if key == 'adaption_prompt':
    return 'LLaMA-Adapter', (f"LLaMA-Adapter {fields['num_tokens']} tokens, top "
                             f"{fields['num_layers']} layers")
  if key == 'reft':
    name = {'loreft': 'LoReFT', 'noreft': 'NoReFT', 'direft': 'DiReFT'}[fields['kind']]
    return name, f"{name} r {fields['rank']}"
  return key, key


def settings_text(overrides: dict, words: tuple[str, ...]) -> str:
  keys = [presets()[w][0].key for w in words if w in presets()]
  parts = []
  for key, value in sorted(overrides.items()):
    if key == 'start_from' or key.endswith('.adapters'):  # paths: the runs' (files') names
      names = [epath.Path(p).parent.name if epath.Path(p).name == 'adapter' else epath.Path(p).name
               for p in value]
      parts.append(' + '.join(names) if len(names) > 1 else f'{names[0]} alone')
      continue
    for method in keys:
      if key.startswith(f'peft.{method}.'):
        key = ('' if len(keys) == 1 else f'{method} ') + key.removeprefix(f'peft.{method}.')
    parts.append(f"{key.replace('optimizer.learning_rate', 'lr').replace('optimizer.', '')} "
                 f'{number(value)}')
  return ', '.join(parts)


def load_points(root: epath.Path) -> tuple[dict, list[dict], list[dict]]:
  """(sweep.json, the done points with their summary and hits, the others' name and status)."""
  sweep = read_json(root / 'sweep.json')
  done, unfinished = [], []
  for point in sweep['points']:
    recorded = epath.Path(point.get('workdir') or root / point['name'])
    # a root copied elsewhere (down from a bucket) still lists its old absolute workdirs
    folder = next((f for f in map(RunFolder, (recorded, root / point['name']))
                   if f.summary.exists()), RunFolder(recorded))
    if not folder.summary.exists():  # the summary decides: sweep.json may be stale
      status = point.get('status', 'pending')
      unfinished.append({'name': point['name'],
                         'status': status if status != 'done' else 'done, no summary.json'})
      continue
    done.append({**point, 'overrides': point.get('overrides') or {},
                 'base': point.get('base') or sweep.get('base'),
                 'summary': folder.read_summary(),
                 'hits': read_json(folder.test_hits) if folder.test_hits.exists() else None})
  return sweep, done, unfinished


def task_of(point: dict) -> str:
  """What a point was scored on, which makes its table: the data source and split of its test
  hits (`sst2 test`), so runs of several configs scored on one task share a table; a run
  whose hits do not say (or that has none) is its base config's."""
  hits = point['hits']
  if hits and hits.get('source'):
    return f"{hits['source']} {hits['split']}"
  return point['base']


def metric_of(points: list[dict]) -> tuple[str, str]:
  """(metric, where it was scored) of the sweep's points: the test metric whose
  `<metric>_after` the summaries have, else, for runs that read no test split (a learning-rate
  search), the eval metric their summaries end with (`eval_<metric>`, on the eval split)."""
  names = {k.removesuffix('_after') for p in points for k in p['summary'] if k.endswith('_after')}
  scored = 'test'
  if not names:
    # the eval loss's perplexity is in every summary: the task metric when there is one
    names = {m for p in points for m in METRICS if f'eval_{m}' in p['summary']}
    names = names - {'perplexity'} or names
    scored = 'eval'
  if len(names) > 1:
    raise ValueError(f'the points report different {scored} metrics: {sorted(names)}')
  return (names.pop() if names else 'accuracy'), scored


def value_key(metric: str, scored: str) -> str:
  return f'{metric}_after' if scored == 'test' else f'eval_{metric}'


def aggregate(words: tuple[str, ...], overrides: dict, members: list[dict], key: str,
              common: dict) -> dict:
  """One table row: a setting's seeds summarized (the `common` overrides left out of its
  settings column, not of its label)."""
  label, family, rest = describe(words, overrides)
  rest = {k: v for k, v in rest.items() if k not in common}
  summaries = [m['summary'] for m in members]
  values = [s.get(key, np.nan) for s in summaries]  # nan: a run without the metric
  # Speed and memory over the seeds that measured them: a run resumed after its last step
  # trains no step and measures neither.
  measured = [s for s in summaries if s.get('tokens_per_s') is not None]
  peak = all('device_peak_bytes' in s for s in measured or summaries)
  memory = [s.get('device_peak_bytes' if peak else 'step_memory_bytes')
            for s in measured or summaries]
  seeds = [m['overrides'].get(SEED_KEY) for m in members]
  names = {setting_name(m) for m in members}
  settings = settings_text(rest, words)
  params = summaries[0]['trainable_params']
  return {
      'label': label, 'family': family, 'settings': settings,
      'title': label + (f', {settings}' if settings else ''),
      'names': sorted(n or 'default' for n in names), 'arg': ','.join(words),
      'overrides': overrides, 'points': [m['name'] for m in members], 'seeds': seeds,
      'values': values, 'n': len(values), 'mean': statistics.fmean(values),
      'std': statistics.stdev(values) if len(values) > 1 else None,
      'trainable_params': params, 'trainable_percent': summaries[0]['trainable_percent'],
      'tokens_per_s': (float(np.median([s['tokens_per_s'] for s in measured]))
                       if measured else None),
      'memory_bytes': max(memory) if None not in memory else None,
      'memory_kind': 'peak' if peak else 'compiled',
      'adapter_bytes': max((s.get('adapter_bytes') or 0 for s in summaries), default=0) or None,
      'hits': [m['hits'] for m in members],
      'order': (FAMILY_ORDER.index(words[0]) if words and words[0] in FAMILY_ORDER
                else len(FAMILY_ORDER), family, params,
                # then by the settings' values, as numbers where they are (3e-4 before 1e-3)
                [(k, (0, v, '') if isinstance(v, (int, float)) else (1, 0, str(v)))
                 for k, v in sorted(rest.items())])}


def setting_name(point: dict) -> str:
  """A point's name without its per-run parts (`_seed=1`, `_test_before=False`)."""
  name = point['name']
  for key in PER_RUN_KEYS:
    if key in point['overrides']:
      value = re.escape(str(point['overrides'][key]))
      name = re.sub(rf'[_.-]*{key}[=_-]?{value}(?![0-9A-Za-z])', '', name)
  return name


def common_overrides(points: list[dict]) -> dict:
  """The overrides every point has with one value (shown once, not in each row)."""
  first = points[0]['overrides'] if points else {}
  return {k: v for k, v in first.items() if k not in PER_RUN_KEYS and
          all(k in p['overrides'] and p['overrides'][k] == v for p in points)}


def settings_of(points: list[dict], value: str) -> list[dict]:
  """The table's rows (`value`: the summary key of the metric), by family, then trainable
  parameters."""
  groups, common = {}, common_overrides(points)
  several = len({p['base'] for p in points}) > 1  # a task scored by runs of several configs
  for point in points:
    overrides = {k: v for k, v in point['overrides'].items() if k not in PER_RUN_KEYS}
    setting = (point['base'], method_words(point.get('arg')),
               json.dumps(overrides, sort_keys=True))
    groups.setdefault(setting, []).append(point)
  rows = [aggregate(words, json.loads(text), members, value, common)
          for (_, words, text), members in groups.items()]
  if several:  # the config names what each row did (trained on a mixture, fused, averaged)
    for row, (base, words, _) in zip(rows, groups):
      config = base.rsplit('/', 1)[-1].removesuffix('.py')
      # an argument that only names the task (configs/fusion.py:trec) says nothing more here
      method = row['label'] if set(words) - set(TASKS) else ''
      row['label'] = f'{config}: {method}' if method else config
      row['title'] = row['label'] + (f", {row['settings']}" if row['settings'] else '')
  return sorted(rows, key=lambda r: r['order'])


def zero_shot(points: list[dict], metric: str) -> dict | None:
  befores = [p['summary'][f'{metric}_before'] for p in points if f'{metric}_before' in p['summary']
             and set(method_words(p.get('arg'))) <= set(IDENTITY_AT_INIT)
             and method_words(p.get('arg'))]
  return {'mean': statistics.fmean(befores), 'min': min(befores), 'max': max(befores),
          'n': len(befores)} if befores else None


def table_line(r: dict, mark_compiled: bool) -> str:
  value = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r['n'] > 1 else '') + f" (n={r['n']})"
  memory = '' if r['memory_bytes'] is None else f"{r['memory_bytes'] / MiB:,.1f}" + (
      ' c' if mark_compiled and r['memory_kind'] == 'compiled' else '')
  tokens = '' if r['tokens_per_s'] is None else f"{r['tokens_per_s']:,.0f}"
  size = r['adapter_bytes']
  size = '' if size is None else f'{size / 1024:.1f} KiB' if size < MiB else f'{size / MiB:.2f} MiB'
  return (f"| {r['label']} | {r['settings']} | {r['trainable_params']:,} | "
          f"{r['trainable_percent']:.3g}% | {value} | {tokens} | {memory} | {size} | "
          f"{', '.join(r['names'])} |")


def task_lines(task: dict) -> list[str]:
  """One base config's zero-shot line and table."""
  metric, rows, zero = f"{task['scored']} {task['metric']}", task['rows'], task['zero_shot']
  kinds = tuple(sorted({r['memory_kind'] for r in rows if r['memory_bytes'] is not None}))
  lines = [f"## {task['base']}: {metric}", '']
  if task['common']:
    lines += ['Every run: ' + ', '.join(f'`{k}={number(v)}`' for k, v in task['common'].items()),
              '']
  if zero:
    spread = f", range {zero['min']:.4f}–{zero['max']:.4f}" if zero['max'] > zero['min'] else ''
    lines += [f"Zero-shot base: {zero['mean']:.4f} {metric} (`{task['metric']}_before` of "
              f"{zero['n']} run{'s' * (zero['n'] > 1)} of methods that start as the identity"
              f'{spread})', '']
  lines += [f'| method | settings | trainable params | % of base | {metric} (mean ± std, n) '
            f"| train tokens/s | {MEMORY_HEADERS.get(kinds, 'memory MiB')} | adapter file | name |",
            '|---' * 9 + '|']
  return lines + [table_line(r, mark_compiled=len(kinds) > 1) for r in rows] + ['']


def markdown(result: dict) -> str:
  lines = [f"# {result['sweep']}", '']
  for task in result['tasks']:
    lines += task_lines(task)
  lines += [MEMORY_NOTE + ' Tokens/s: the median over seeds. Name: what `--pair` takes.']
  if result['not_finished']:
    lines += ['', 'Not finished: ' + ', '.join(f"{p['name']} ({p['status']})"
                                               for p in result['not_finished'])]
  if result['pairs']:
    lines += ['', '## A − B, 95% interval over test rows, n seeds A/B', '',
              f"{RESAMPLES:,} resamples of the test rows (numpy seed {BOOTSTRAP_SEED}); a row's "
              "outcome on a side is its hits averaged over that side's seeds.", '',
              '| A | B | metric | A − B | 95% interval | resamples ≤ 0 | n seeds A/B | rows |',
              '|---' * 8 + '|']
    lines += [f"| {p['a']} | {p['b']} | {p['metric']} | {p['difference']:+.4f} | "
              f"[{p['low']:+.4f}, {p['high']:+.4f}] | {p['at_most_zero']:.4f} | "
              f"{p['seeds_a']}/{p['seeds_b']} | {p['rows']} |" for p in result['pairs']]
  return '\n'.join(lines) + '\n'


def plot(tasks: list[dict]) -> bytes:
  """The PNG: a panel per base config (task), one above the other."""
  figure, panels = plt.subplots(len(tasks), 1, figsize=(10, 4.5 * len(tasks)), squeeze=False,
                                layout='constrained')
  for task, axes in zip(tasks, panels[:, 0]):
    plot_metric(task, axes)
  buffer = io.BytesIO()  # through epath afterwards: savefig cannot write to gs://
  figure.savefig(buffer, format='png', dpi=150, bbox_inches='tight')
  plt.close(figure)
  return buffer.getvalue()


def plot_metric(task: dict, axes) -> None:
  """The metric against trainable parameters: a line per family through its seed means."""
  families = {}
  for r in task['rows']:  # the rows of a family differ in size alone
    families.setdefault((r['family'], r['settings']), []).append(r)
  colors, markers = plt.get_cmap('tab10').colors, 'sD^vPX*<>p'  # markers: single settings
  for i, group in enumerate(families.values()):
    color, params = colors[i % len(colors)], [r['trainable_params'] for r in group]
    for r in group:
      axes.scatter([r['trainable_params']] * r['n'], r['values'], color=color, alpha=0.3, s=12,
                   zorder=3)
    if len(group) > 1:
      axes.plot(params, [r['mean'] for r in group], 'o-', color=color,
                label=', '.join(filter(None, (group[0]['family'], group[0]['settings']))))
    else:
      axes.plot(params, [group[0]['mean']], markers[i % len(markers)], color=color, markersize=8,
                linestyle='none', label=group[0]['title'])
  if task['zero_shot']:
    axes.axhline(task['zero_shot']['mean'], color='gray', linestyle='--', label='zero-shot base')
  axes.set_xscale('log')
  axes.set_xlabel('trainable parameters')
  axes.set_ylabel(f"{task['scored']} {task['metric']} (dots: seeds)")
  axes.set_title(task['base'], fontsize='medium')
  axes.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))
  axes.grid(alpha=0.3)


def report(root: str, out: str | None = None, pairs=()) -> tuple[dict, str]:
  """(the JSON written, the Markdown written); nothing is written unless every pair is valid."""
  root = epath.Path(root)
  sweep, points, unfinished = load_points(root)
  tasks = []
  for base in dict.fromkeys(map(task_of, points)):  # each its own metric and zero shot
    members = [p for p in points if task_of(p) == base]
    metric, scored = metric_of(members)
    tasks.append({'base': base, 'metric': metric, 'scored': scored,
                  'common': common_overrides(members),
                  'zero_shot': zero_shot(members, metric) if scored == 'test' else None,
                  'rows': settings_of(members, value_key(metric, scored))})
  compared = [compare([r for t in tasks for r in t['rows']], a, b) for a, b in pairs]
  result = {'root': str(root), 'sweep': sweep.get('sweep'), 'arg': sweep.get('arg'),
            'tasks': tasks, 'not_finished': unfinished, 'pairs': compared}
  text = markdown(result)
  prefix = out or str(root / 'report')
  epath.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(f'{prefix}.md').write_text(text, encoding='utf-8')
  saved = {**result, 'tasks': [{**t, 'rows': [{k: v for k, v in r.items()
                                               if k not in ('hits', 'order')} for r in t['rows']]}
                                for t in tasks]}
  epath.Path(f'{prefix}.json').write_text(json.dumps(saved, indent=1), encoding='utf-8')
  if tasks:
    epath.Path(f'{prefix}.png').write_bytes(plot(tasks))
  return saved, text


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m experiments.report ROOT [--out=PREFIX] [--pair=A,B]')
  pairs = [tuple(p.split(',')) for p in flags.FLAGS.pair]
  if any(len(p) != 2 or not all(p) for p in pairs):
    raise app.UsageError(f'--pair takes two setting names, A,B; got {flags.FLAGS.pair}')
  _, text = report(argv[1], flags.FLAGS.out, pairs)
  print(text, end='')


if __name__ == '__main__':
  # flags only as a command, so that tests can import this beside modules owning --out
  flags.DEFINE_string('out', None, 'output path without extension (default ROOT/report)')
  flags.DEFINE_multi_string('pair', [], 'A,B: two setting names to compare (paired bootstrap)')
  command.run(main)
