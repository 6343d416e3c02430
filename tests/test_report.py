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
