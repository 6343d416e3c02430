"""cifar_jax/report.py: report.png at the end of a run and with --mode=report, and the final
eval's confusion matrix in metrics.jsonl and TensorBoard (a run of main.py: conftest's
`trained_run`)."""
import os
import shutil

import numpy as np
import pytest
from helpers import main_py, metrics_records

from cifar_jax.data.cifar import CLASS_NAMES


@pytest.mark.e2e
def test_run_ends_with_a_readable_report(trained_run):
  from PIL import Image
  with Image.open(os.path.join(trained_run, 'report.png')) as image:
    assert image.size == (1600, 1100)
    assert np.asarray(image.convert('L')).std() > 10  # Something is drawn.


@pytest.mark.e2e
def test_final_eval_records_confusion_matrix_and_class_accuracy(trained_run):
  records = [r for r in metrics_records(trained_run) if 'confusion_matrix' in r]
  assert [r['step'] for r in records] == [8]  # The final eval only.
  confusion = np.asarray(records[0]['confusion_matrix'])
  final = [r for r in metrics_records(trained_run)
           if r.get('step') == 8 and 'eval_accuracy' in r][-1]
  assert confusion.shape == (10, 10) and confusion.sum() == final['eval_count'] == 102
  assert np.trace(confusion) / confusion.sum() == pytest.approx(final['eval_accuracy'])
  assert set(records[0]['class_accuracy']) == set(CLASS_NAMES['cifar10'])
  # TensorBoard: the image and the per-class scalars.
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(trained_run, size_guidance={'images': 0, 'scalars': 0})
  events.Reload()
  assert 'confusion_matrix' in events.Tags()['images']
  assert 'class_accuracy/cat' in events.Tags()['scalars']


@pytest.mark.e2e
def test_report_mode_redraws_it(trained_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_run, workdir)
  os.remove(os.path.join(workdir, 'report.png'))
  result = main_py(f'--workdir={workdir}', '--mode=report')
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.exists(os.path.join(workdir, 'report.png'))


def test_a_population_is_drawn_as_its_mean_a_min_max_band_and_the_ensemble():
  from matplotlib.collections import PolyCollection

  from cifar_jax import report
  members = lambda base, i: [base + 0.01 * i + d for d in (-0.02, 0.0, 0.03)]
  records = [{'step': s, 'epoch': s / 4, 'train_loss': 2.0 - 0.1 * s, 'train_accuracy': 0.1 * s,
              'learning_rate': 0.1, 'train_loss_members': members(2.0 - 0.1 * s, 0),
              'train_accuracy_members': members(0.1 * s, 0),
              'learning_rate_members': [0.05, 0.1, 0.2]} for s in range(1, 9)]
  records += [{'step': s, 'eval_accuracy': 0.05 * s, 'eval_loss': 2.0 - 0.1 * s,
               'eval_accuracy_members': members(0.05 * s, 1), 'eval_accuracy_std': 0.02,
               'eval_loss_members': members(2.0 - 0.1 * s, 1), 'ensemble_accuracy': 0.06 * s,
               'ensemble_loss': 1.9 - 0.1 * s} for s in (4, 8)]
  fig = report.draw(records, 'cifar10', 'a population')
  loss_ax, acc_ax, lr_ax = fig.axes[:3]
  for ax in (loss_ax, acc_ax):
    labels = ax.get_legend_handles_labels()[1]
    assert 'train: 3 members, min-max' in labels and 'eval: 3 members, min-max' in labels
    assert 'eval of the ensemble (mean of the softmax)' in labels
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
  assert 'learning rate: 3 members, min-max' in lr_ax.get_legend_handles_labels()[1]
  assert '± 2.00%, ensemble 48.00%' in acc_ax.get_title()
  solo = report.draw([{k: v for k, v in r.items() if 'members' not in k and 'ensemble' not in k
                       and 'std' not in k} for r in records], 'cifar10', 'solo')
  assert not [c for c in solo.axes[0].collections if isinstance(c, PolyCollection)]
