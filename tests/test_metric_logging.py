"""cifar_jax/metric_logging.py: metrics.jsonl and TensorBoard events hold each (step, kind)
once across kills, resumes and relaunches, on local disk and on gs:// (conftest's `root`)."""
import time

import pytest

from cifar_jax import metric_logging
from cifar_jax.runtime import storage


def _launch(workdir, resume_step, steps, total=12, die=False):
  """One launch of a run as train.py logs it: train records every step, eval every 6
  steps, the final eval's confusion record; `die`: killed without closing."""
  writer = metric_logging.create_writer(workdir, start_step=resume_step)
  for step in steps:
    writer.write_scalars(step, {'train_loss': 1.0 / step + resume_step})  # Values per launch.
    if step % 6 == 0:
      writer.write_scalars(step, {'eval_accuracy': step / 100 + resume_step})
    if step == total:
      writer.write_json(step, {'confusion_matrix': [[resume_step]], 'class_accuracy': {'a': 1}})
  if die:
    writer.flush()  # What the loop flushes before the checkpoint it died in.
  else:
    writer.close()


def test_metrics_jsonl_holds_each_record_once_across_kills_and_resumes(root):
  _launch(root, 0, range(1, 9), die=True)        # Killed after step 8; checkpoint 4 complete.
  _launch(root, 4, range(5, 8), die=True)        # Killed again; checkpoint 4 still the latest.
  _launch(root, 4, range(5, 13))                 # Resumed from 4, finished.
  _launch(root, 12, [])                          # Relaunched when done: evaluates step 12 again.
  writer = metric_logging.create_writer(root, start_step=12)
  writer.write_scalars(12, {'eval_accuracy': 0.5})
  writer.write_json(12, {'confusion_matrix': [[99]]})
  writer.close()
  records = metric_logging.read_records(root)
  keys = [(r['step'], metric_logging.record_kind(r)) for r in records]
  assert len(keys) == len(set(keys))  # Exactly once.
  assert [s for s, k in keys if k == 'train'] == list(range(1, 13))
  assert [s for s, k in keys if k == 'eval'] == [6, 12]
  assert [s for s, k in keys if k == 'confusion'] == [12]
  by_key = dict(zip(keys, records))
  assert by_key[3, 'train']['train_loss'] == 1 / 3          # From the first launch.
  assert by_key[5, 'train']['train_loss'] == 1 / 5 + 4      # Re-run: from the resumed launch.
  assert by_key[12, 'eval']['eval_accuracy'] == 0.5         # The re-evaluation replaced it.
  assert by_key[12, 'confusion']['confusion_matrix'] == [[99]]
  text = storage.read_text(storage.path(root) / 'metrics.jsonl')
  assert text.endswith('\n') and text.count('\n') == len(records)


def test_a_line_cut_by_a_crash_is_skipped(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "tr')
  assert metric_logging.read_records(str(tmp_path)) == [{'step': 1, 'train_loss': 2.0}]
  _launch(str(tmp_path), 1, [2])
  assert [r['step'] for r in metric_logging.read_records(str(tmp_path))] == [1, 2]


def test_tensorboard_shows_each_step_once_after_a_resume(root, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  _launch(root, 0, range(1, 9), die=True)
  time.sleep(0.01)  # Event file names carry a time stamp: the next launch sorts after.
  _launch(root, 4, range(5, 13))
  names = sorted(p.name for p in storage.path(root).iterdir() if 'tfevents' in p.name)
  assert len(names) == 2
  local = tmp_path / 'events'  # TensorBoard reads gs:// through TensorFlow: read a copy.
  storage.copy_files(root, local, names)
  events = event_accumulator.EventAccumulator(str(local), purge_orphaned_data=True)
  events.Reload()
  losses = events.Scalars('train_loss')
  assert [e.step for e in losses] == list(range(1, 13))
  assert [e.value for e in losses][4] == pytest.approx(1 / 5 + 4)  # The re-run step's value.
  assert [e.step for e in events.Scalars('class_accuracy/a')] == [12]
