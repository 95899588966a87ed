r"""The tables, plot and paired comparisons of a finished (or partly finished) sweep.

    python -m experiments.report ROOT [--out=PREFIX] [--pair=A,B ...]
    python -m experiments.report runs/small --out=experiments/results/small --pair=A,B

reads `ROOT/sweep.json` (experiments/sweep.py writes it) and each done point's
`summary.json` and `test_hits.json`; writes `PREFIX.md` (printed too), `PREFIX.json` (the
same numbers) and `PREFIX.png` (the test metric against trainable parameters), a table and
a panel per base config (task); PREFIX defaults to `ROOT/report`; paths go through epath.

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

from additive_jax import cli  # noqa: E402
from additive_jax.peft.lora import TARGETS as LORA_TARGETS  # noqa: E402
from additive_jax.peft.registry import field_types, presets  # noqa: E402

SEED_KEY = 'seed'
LOCAL_WORD = 'runlocal'  # shrinks a run; the same setting otherwise
IDENTITY_AT_INIT = ('pfeiffer', 'houlsby', 'parallel', 'lora', 'ia3')
FAMILY_ORDER = ('pfeiffer', 'houlsby', 'parallel', 'lora', 'ia3', 'prompt', 'prefix', 'ladder')
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
INDEX_ELEMENTS = 1 << 22  # resampled row indices drawn at once (32 MiB of int64)
MiB = 1 << 20
# the method fields a label shows (the rest of a method's overrides go to the settings column)
SHOWN_FIELDS = {'bottleneck': ('placement', 'dim', 'reduction_factor'),
                'lora': ('rank', 'alpha', 'targets'), 'prompt': ('num_tokens',),
                'prefix': ('num_tokens',), 'ladder': ('reduction',)}
PLACEMENT_NAMES = {'pfeiffer': 'Pfeiffer adapter', 'houlsby': 'Houlsby adapter',
                   'parallel': 'parallel adapter'}
MEMORY_HEADERS = {('peak',): 'peak memory MiB', ('compiled',): 'step memory MiB'}  # else mixed
MEMORY_NOTE = ("Memory: the device allocator's peak (`device_peak_bytes`) where every seed "
               "reported one, else the compiled train step's (`step_memory_bytes`; marked c in a "
               'column of both), the largest over seeds.')


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
  return key, key


def settings_text(overrides: dict, words: tuple[str, ...]) -> str:
  keys = [presets()[w][0].key for w in words if w in presets()]
  parts = []
  for key, value in sorted(overrides.items()):
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
    workdir = next((w for w in (recorded, root / point['name']) if (w / 'summary.json').exists()),
                   recorded)
    status = point.get('status', 'pending')
    if status != 'done' or not (workdir / 'summary.json').exists():
      unfinished.append({'name': point['name'],
                         'status': status if status != 'done' else 'done, no summary.json'})
      continue
    hits = workdir / 'test_hits.json'
    done.append({**point, 'overrides': point.get('overrides') or {},
                 'base': point.get('base') or sweep.get('base'),
                 'summary': read_json(workdir / 'summary.json'),
                 'hits': read_json(hits) if hits.exists() else None})
  return sweep, done, unfinished


def metric_of(points: list[dict]) -> str:
  """The test metric of the sweep's points: the one whose `<metric>_after` each summary has."""
  names = {k.removesuffix('_after') for p in points for k in p['summary'] if k.endswith('_after')}
  if len(names) > 1:
    raise ValueError(f'the points report different test metrics: {sorted(names)}')
  return names.pop() if names else 'accuracy'


def aggregate(words: tuple[str, ...], overrides: dict, members: list[dict], metric: str) -> dict:
  """One table row: a setting's seeds summarized."""
  label, family, rest = describe(words, overrides)
  summaries = [m['summary'] for m in members]
  values = [s.get(f'{metric}_after', np.nan) for s in summaries]  # nan: a run without a test
  peak = all('device_peak_bytes' in s for s in summaries)
  memory = [s.get('device_peak_bytes' if peak else 'step_memory_bytes') for s in summaries]
  seeds = [m['overrides'].get(SEED_KEY) for m in members]
  names = {re.sub(rf'[_.-]*seed[=_-]?{seed}(?![0-9])', '', m['name']) if seed is not None
           else m['name'] for m, seed in zip(members, seeds)}  # each without its seed part
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
      'tokens_per_s': (float(np.median([s['tokens_per_s'] for s in summaries]))
                       if all('tokens_per_s' in s for s in summaries) else None),
      'memory_bytes': max(memory) if None not in memory else None,
      'memory_kind': 'peak' if peak else 'compiled',
      'adapter_bytes': max((s.get('adapter_bytes') or 0 for s in summaries), default=0) or None,
      'hits': [m['hits'] for m in members],
      'order': (FAMILY_ORDER.index(words[0]) if words and words[0] in FAMILY_ORDER
                else len(FAMILY_ORDER), family, params, settings)}


def settings_of(points: list[dict], metric: str) -> list[dict]:
  """The table's rows, by family, then trainable parameters."""
  groups = {}
  for point in points:
    overrides = {k: v for k, v in point['overrides'].items() if k != SEED_KEY}
    key = (method_words(point.get('arg')), json.dumps(overrides, sort_keys=True))
    groups.setdefault(key, []).append(point)
  rows = [aggregate(words, json.loads(text), members, metric)
          for (words, text), members in groups.items()]
  return sorted(rows, key=lambda r: r['order'])


def zero_shot(points: list[dict], metric: str) -> dict | None:
  befores = [p['summary'][f'{metric}_before'] for p in points if f'{metric}_before' in p['summary']
             and set(method_words(p.get('arg'))) <= set(IDENTITY_AT_INIT)
             and method_words(p.get('arg'))]
  return {'mean': statistics.fmean(befores), 'min': min(befores), 'max': max(befores),
          'n': len(befores)} if befores else None


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
  """A − B over rows, from seeds × rows hits of each side: the difference, the 95% percentile
  interval of the rows resampled with replacement, and the fraction of resamples at most 0."""
  per_row = hits_a.mean(axis=0) - hits_b.mean(axis=0)
  rows = per_row.size
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  chunk = max(1, INDEX_ELEMENTS // rows)  # resamples per draw, so the index matrix stays bounded
  for start in range(0, resamples, chunk):
    stop = min(start + chunk, resamples)
    means[start:stop] = per_row[rng.integers(0, rows, size=(stop - start, rows))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return {'difference': float(per_row.mean()), 'low': float(low), 'high': float(high),
          'at_most_zero': float(np.mean(means <= 0)), 'rows': rows, 'resamples': resamples}


def stacked_hits(row: dict) -> tuple[np.ndarray, dict]:
  """A setting's seeds × rows hits and what they were scored on; its seeds must agree."""
  name, missing = row['names'][0], [p for p, h in zip(row['points'], row['hits']) if h is None]
  if missing:
    raise ValueError(f'{name}: {", ".join(missing)} wrote no test_hits.json')
  scored = [{'metric': h['metric'], 'split': h['split'], 'limit': h['limit'],
             'rows': len(h['hits'])} for h in row['hits']]
  if any(s != scored[0] for s in scored):
    raise ValueError(f'{name}: its seeds were tested on different rows: {scored}')
  return np.array([h['hits'] for h in row['hits']], dtype=np.float64), scored[0]


def compare(rows: list[dict], a: str, b: str) -> dict:
  """The paired bootstrap of the settings named `a` and `b` (see the module docstring)."""
  def find(name):  # a setting's name, else the start of one (up to a `_`)
    found = ([r for r in rows if name in r['names']] or
             [r for r in rows if any(n.startswith(f'{name}_') for n in r['names'])])
    if len(found) != 1:
      known = ', '.join(n for r in (found or rows) for n in r['names'])
      raise ValueError(f'--pair {a},{b}: {name!r} names {len(found)} finished settings (one is '
                       f'needed): {known}')
    return found[0]
  row_a, row_b = find(a), find(b)
  a, b = row_a['names'][0], row_b['names'][0]  # as the table names them
  (hits_a, scored_a), (hits_b, scored_b) = stacked_hits(row_a), stacked_hits(row_b)
  differ = [f'{k} {scored_a[k]!r} vs {scored_b[k]!r}' for k in scored_a
            if scored_a[k] != scored_b[k]]
  if differ:
    raise ValueError(f'cannot pair {a} with {b}: their test hits differ in {"; ".join(differ)}')
  return {'a': a, 'b': b, 'metric': scored_a['metric'], 'seeds_a': len(hits_a),
          'seeds_b': len(hits_b), **paired_bootstrap(hits_a, hits_b)}


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
  metric, rows, zero = task['metric'], task['rows'], task['zero_shot']
  kinds = tuple(sorted({r['memory_kind'] for r in rows if r['memory_bytes'] is not None}))
  lines = [f"## {task['base']}: test {metric}", '']
  if zero:
    spread = f", range {zero['min']:.4f}–{zero['max']:.4f}" if zero['max'] > zero['min'] else ''
    lines += [f"Zero-shot base: {zero['mean']:.4f} test {metric} (`{metric}_before` of "
              f"{zero['n']} run{'s' * (zero['n'] > 1)} of methods that start as the identity"
              f'{spread})', '']
  lines += [f'| method | settings | trainable params | % of base | test {metric} (mean ± std, n) '
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
  axes.set_ylabel(f"test {task['metric']} (dots: seeds)")
  axes.set_title(task['base'], fontsize='medium')
  axes.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))
  axes.grid(alpha=0.3)


def report(root: str, out: str | None = None, pairs=()) -> tuple[dict, str]:
  """(the JSON written, the Markdown written); nothing is written unless every pair is valid."""
  root = epath.Path(root)
  sweep, points, unfinished = load_points(root)
  tasks = []
  for base in dict.fromkeys(p['base'] for p in points):  # each its own metric and zero shot
    members = [p for p in points if p['base'] == base]
    metric = metric_of(members)
    tasks.append({'base': base, 'metric': metric, 'zero_shot': zero_shot(members, metric),
                  'rows': settings_of(members, metric)})
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
  cli.run(main)
