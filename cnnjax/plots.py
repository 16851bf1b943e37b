"""--mode=plot, and the end of training: workdir/plots/{loss,accuracy}.png from metrics.jsonl."""
import json
import os

import numpy as np

from cnnjax import workdir as workdir_lib
from cnnjax.errors import UserError
from cnnjax.report import METRICS_FILE, read_metrics


def smooth(values, weight=0.9):
  """TensorBoard's smoothing: a debiased exponential moving average."""
  out, average = [], 0.0
  for i, v in enumerate(values, start=1):
    average = weight * average + (1 - weight) * v
    out.append(average / (1 - weight**i))
  return np.asarray(out)


def write(workdir):
  """Writes the plots of workdir's metrics.jsonl; returns the paths written."""
  records = read_metrics(workdir)
  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  if not train and not evals:
    raise UserError(f'no metrics in {os.path.join(workdir, METRICS_FILE)}: train there first')
  try:
    import matplotlib
  except ImportError:
    raise UserError('the plots need matplotlib, which is not installed (pip install '
                    'matplotlib, then run.py --mode=plot)') from None
  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt
  recipe = _recipe(workdir)
  out = os.path.join(workdir, 'plots')
  workdir_lib.make_writable(out, f'plots folder {out!r}')
  written = []
  if train:
    steps = [r['step'] for r in train]
    loss = [r['loss'] for r in train]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(steps, loss, color='tab:blue', alpha=0.3, linewidth=1, label='logged')
    ax.plot(steps, smooth(loss), color='tab:blue', linewidth=2, label='smoothed (EMA 0.9)')
    ax.set(title=f'Training loss (cross-entropy + weight losses){recipe}', xlabel='step',
           ylabel='loss')
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, os.path.join(out, 'loss.png')))
  if evals:
    steps = [r['step'] for r in evals]
    precision = [100 * r['precision'] for r in evals]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(steps, precision, marker='o', color='tab:green')
    for s, p in zip(steps[-1:], precision[-1:]):
      ax.annotate(f'{p:.2f}%', (s, p), textcoords='offset points', xytext=(-10, 8), ha='right')
    ax.set(title=f'Test precision @ 1 ({evals[-1]["count"]:,} examples){recipe}', xlabel='step',
           ylabel='precision @ 1 (%)')
    ax.grid(alpha=0.3)
    written.append(_save(fig, os.path.join(out, 'accuracy.png')))
  return written


def _recipe(workdir):
  """'\n' + the run's recipe line from config.json, for the titles ('' if none)."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  try:
    with open(path) as f:
      recipe = json.load(f).get('recipe', '')
  except (OSError, ValueError, AttributeError):  # unreadable, or not an object: no title line
    return ''
  return f'\n{recipe}' if recipe else ''


def _save(fig, path):
  import matplotlib.pyplot as plt
  fig.tight_layout()
  temporary = f'{path}.{os.getpid()}.tmp.png'  # a --mode=plot beside the run's own redraw
  try:
    fig.savefig(temporary, dpi=100)
    os.replace(temporary, path)
  except OSError as e:  # a full disk, say: the figure before stays as it was
    if os.path.exists(temporary):
      os.remove(temporary)
    raise UserError(f'cannot write {path}: {e.strerror or e}') from None
  finally:
    plt.close(fig)
  return path
