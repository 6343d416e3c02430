"""Plots a person can read: `WORKDIR/report.png` from `metrics.jsonl`.

Four panels: train and eval loss against epoch; train and eval accuracy against
epoch (for a population: the members' mean, their min-max band and the ensemble's eval);
the learning rate; the final eval's confusion matrix (row-normalized) with
each class's accuracy in its row label, and per-class accuracy bars. Written at the end of
every run (unless `config.report=False`) and by `main.py --mode=report`. matplotlib's
Figure API with the Agg canvas (no pyplot, no display); no JAX.
"""
from __future__ import annotations

import io
import json

import numpy as np

from cifar_jax import metric_logging
from cifar_jax.data.cifar import CLASS_NAMES
from cifar_jax.errors import UserError
from cifar_jax.runtime import storage

REPORT = 'report.png'


def class_accuracy(confusion: np.ndarray, names) -> dict:
  """{class name: accuracy} from a confusion matrix (rows: true class)."""
  totals = confusion.sum(axis=1)
  return {name: float(confusion[i, i] / totals[i]) if totals[i] else 0.0
          for i, name in enumerate(names)}


def _figure(**kwargs):
  """A matplotlib Figure drawn by the Agg canvas: no pyplot, no display, no global state."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(layout='constrained', dpi=100, **kwargs)


def _draw_confusion(ax, confusion: np.ndarray, names, step: int):
  totals = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  rates = confusion / totals
  n = len(names)
  image = ax.imshow(rates, cmap='Blues', vmin=0.0, vmax=1.0)
  accuracy = class_accuracy(confusion, names)
  ticks = np.arange(n)
  small = n <= 20
  ax.set_xticks(ticks if small else ticks[::10])
  ax.set_yticks(ticks if small else ticks[::10])
  ax.set_xticklabels(names if small else [names[i] for i in ticks[::10]], rotation=45,
                     ha='right', fontsize=8)
  ax.set_yticklabels([f'{names[i]} ({accuracy[names[i]]:.0%})' for i in
                      (ticks if small else ticks[::10])], fontsize=8)
  if small:
    for i in range(n):
      for j in range(n):
        if confusion[i, j]:
          ax.text(j, i, f'{int(confusion[i, j])}', ha='center', va='center', fontsize=6,
                  color='white' if rates[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class (its accuracy)')
  overall = np.trace(confusion) / max(confusion.sum(), 1)
  ax.set_title(f'Confusion matrix, eval at step {step} ({overall:.2%} of '
               f'{int(confusion.sum())})')
  return image


def confusion_png(confusion: np.ndarray, names, step: int) -> bytes:
  """The confusion matrix alone, as PNG bytes (for TensorBoard)."""
  fig = _figure(figsize=(7, 6))
  ax = fig.add_subplot()
  fig.colorbar(_draw_confusion(ax, confusion, names, step), ax=ax, label='fraction of the row')
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  return buffer.getvalue()


def _records(workdir) -> list[dict]:
  records = metric_logging.read_records(workdir)
  if records is None:
    raise UserError(f'{storage.path(workdir) / metric_logging.METRICS} does not exist; point '
                    '--workdir at a training run')
  return records


def _last_by_step(records: list[dict], key: str) -> list[dict]:
  """The records with `key`, the last one per step (logs written before each record was
  kept exactly once could hold re-run steps twice)."""
  by_step = {r['step']: r for r in records if key in r}
  return [by_step[s] for s in sorted(by_step)]


def _band(ax, xs, records: list[dict], name: str, color: str, label: str):
  """A population's members, min to max, shaded around their mean (`name`'s line)."""
  lists = [r.get(f'{name}_members') for r in records]
  if records and all(isinstance(v, list) and v for v in lists):
    ax.fill_between(xs, [min(v) for v in lists], [max(v) for v in lists], color=color,
                    alpha=0.2, linewidth=0, label=f'{label}: {len(lists[-1])} members, min-max')


def write_report(workdir) -> str:
  """Draws `workdir/report.png` from its metrics.jsonl; returns the path."""
  records = _records(workdir)
  if not any('train_loss' in r or 'eval_accuracy' in r for r in records):
    raise UserError(f'{workdir}/metrics.jsonl has no train or eval records yet')
  dataset = 'cifar10'
  saved_config = storage.read_text(storage.path(workdir) / 'config.json')
  if saved_config is not None:
    dataset = json.loads(saved_config).get('dataset', dataset)
  fig = draw(records, dataset, f'{storage.path(workdir)}: {dataset}')
  path = storage.path(workdir) / REPORT
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  storage.write_whole(path, buffer.getvalue())
  return str(path)


def draw(records: list[dict], dataset: str, title: str):
  """The report's Figure from metrics.jsonl's records."""
  train = _last_by_step(records, 'train_loss')
  evals = _last_by_step(records, 'eval_accuracy')
  confusions = _last_by_step(records, 'confusion_matrix')
  # Epoch of any step, from the train records' own epoch/step ratio.
  per_step = train[-1]['epoch'] / train[-1]['step'] if train and train[-1].get('epoch') else None
  epoch = lambda rs: [r['step'] * per_step if per_step else r['step'] for r in rs]
  x_label = 'epoch' if per_step else 'step'

  fig = _figure(figsize=(16, 11))
  grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.4))
  loss_ax, acc_ax, lr_ax = (fig.add_subplot(grid[0, i]) for i in range(3))
  for ax, key, title in ((loss_ax, 'loss', 'Loss'), (acc_ax, 'accuracy', 'Accuracy')):
    if train:
      ax.plot(epoch(train), [r[f'train_{key}'] for r in train], '.-', markersize=4,
              label='train (mean since the previous log)', color='tab:blue')
      _band(ax, epoch(train), train, f'train_{key}', 'tab:blue', 'train')
    if evals:
      ax.plot(epoch(evals), [r[f'eval_{key}'] for r in evals], 'o-', label='eval (test split)',
              color='tab:orange')
      _band(ax, epoch(evals), evals, f'eval_{key}', 'tab:orange', 'eval')
      ensemble = [r for r in evals if f'ensemble_{key}' in r]
      if ensemble:
        ax.plot(epoch(ensemble), [r[f'ensemble_{key}'] for r in ensemble], 's--',
                color='tab:red', label='eval of the ensemble (mean of the softmax)')
    ax.set_xlabel(x_label)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
  if evals:
    best = max(evals, key=lambda r: r['eval_accuracy'])
    final = evals[-1]
    spread = f' ± {final["eval_accuracy_std"]:.2%}' if 'eval_accuracy_std' in final else ''
    ensemble = (f', ensemble {final["ensemble_accuracy"]:.2%}' if 'ensemble_accuracy' in final
                else '')
    acc_ax.set_title(f'Accuracy: final eval {final["eval_accuracy"]:.2%}{spread}{ensemble}, '
                     f'best {best["eval_accuracy"]:.2%} (step {best["step"]})', fontsize=10)
  if train and 'learning_rate' in train[0]:
    lr_ax.plot(epoch(train), [r['learning_rate'] for r in train], '.-', markersize=4,
               color='tab:green')
    _band(lr_ax, epoch(train), train, 'learning_rate', 'tab:green', 'learning rate')
  lr_ax.set_xlabel(x_label)
  lr_ax.set_ylabel('learning rate')
  lr_ax.set_title('Learning rate')
  lr_ax.grid(alpha=0.3)
  if lr_ax.get_legend_handles_labels()[0]:
    lr_ax.legend(fontsize=9)
  conf_ax, bar_ax = fig.add_subplot(grid[1, :2]), fig.add_subplot(grid[1, 2])
  names = list(CLASS_NAMES[dataset])
  if confusions:
    last = confusions[-1]
    confusion = np.asarray(last['confusion_matrix'])
    image = _draw_confusion(conf_ax, confusion, names, last['step'])
    fig.colorbar(image, ax=conf_ax, label='fraction of the row')
    accuracy = class_accuracy(confusion, names)
    shown = sorted(accuracy, key=accuracy.get)
    if len(shown) > 20:  # CIFAR-100: the 10 worst and the 10 best classes.
      shown = shown[:10] + shown[-10:]
    bar_ax.barh(range(len(shown)), [accuracy[n] for n in shown], color='tab:blue')
    bar_ax.set_yticks(range(len(shown)))
    bar_ax.set_yticklabels(shown, fontsize=8)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_xlabel('accuracy')
    bar_ax.set_title('Per-class accuracy' + (' (10 worst, 10 best)' if len(names) > 20 else ''))
    bar_ax.grid(alpha=0.3, axis='x')
  else:
    for ax in (conf_ax, bar_ax):
      ax.axis('off')
    conf_ax.text(0.5, 0.5, 'no final eval yet', ha='center', va='center')
  fig.suptitle(title, fontsize=12)
  return fig
