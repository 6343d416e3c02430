"""Metric writers: console, TensorBoard events and `metrics.jsonl`; a progress line.

`metrics.jsonl` holds one JSON object per line, {"step": N, "<metric>": value,
...}, so runs can be compared with nothing but the standard library. Each record
is there exactly once, however often the run was preempted, killed and resumed:
it reads as if the run had never been interrupted.

TensorBoard events are written with the `tensorboard` package's protos, not
clu's writers, tf.summary or `tensorboard.summary.Writer`: all of them import
TensorFlow, which a training run must not need (GPU images commonly ship JAX
without it) nor pay for when it is installed; and they write through
TensorFlow's file system, not `storage` (gs:// workdirs).
"""
from __future__ import annotations

import json
import os
import socket
import time

from absl import logging

from cifar_jax.runtime import storage

METRICS = 'metrics.jsonl'


def record_kind(record: dict) -> str:
  """'train', 'eval' or 'confusion': a step has at most one record of each kind."""
  if 'confusion_matrix' in record:
    return 'confusion'
  return 'eval' if any(k.startswith('eval_') for k in record) else 'train'


def read_records(workdir) -> list[dict] | None:
  """The records of `workdir/metrics.jsonl` (None if there is none). A line that does not
  parse (a write cut by a crash) is skipped with a warning."""
  text = storage.read_text(storage.path(workdir) / METRICS)
  if text is None:
    return None
  records = []
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('%s line %d is not JSON (cut by a crash?); skipped.', METRICS, number)
  return records


class JsonlWriter:
  """`workdir/metrics.jsonl`, each (step, kind) record exactly once.

  A launch that resumes from the checkpoint of step S re-runs the steps after S,
  so it first drops the records after S that an earlier launch logged before it
  died (`resume_step`): they would otherwise appear twice. A record of the same
  step and kind as one already there (a finished run resumed at its last step
  evaluates again) replaces it. Records are durable at each flush: the training
  loop flushes before every checkpoint, so no record up to a checkpoint's step can
  be lost (storage.GrowingFile: appended locally; rewritten whole on gs://).
  """

  def __init__(self, workdir, resume_step: int = 0):
    self._path = storage.path(workdir) / METRICS
    records = read_records(workdir) or []
    kept = [r for r in records if r.get('step', 0) <= resume_step]
    if len(kept) < len(records):
      logging.info('%s: dropped %d records after step %d (re-run from its checkpoint).',
                   self._path, len(records) - len(kept), resume_step)
    self._lines = []  # JSON lines, in order.
    self._index = {}  # (step, kind) -> position in _lines.
    for r in kept:
      self._index[(r.get('step', 0), record_kind(r))] = len(self._lines)
      self._lines.append(json.dumps(r))
    self._file = storage.GrowingFile(self._path, self._content())

  def _content(self) -> bytes:
    return ''.join(line + '\n' for line in self._lines).encode('utf-8')

  def _add(self, record: dict):
    key, line = (record['step'], record_kind(record)), json.dumps(record)
    if key in self._index:
      self._lines[self._index[key]] = line
      self._file.rewrite(self._content())
      return
    self._index[key] = len(self._lines)
    self._lines.append(line)
    self._file.write((line + '\n').encode('utf-8'))
    self._file.flush()

  def write_scalars(self, step: int, scalars: dict):
    """Numbers, or lists of them (a population's per-member values)."""
    self._add({'step': int(step), **{k: [float(x) for x in v] if isinstance(v, (list, tuple))
                                     else float(v) for k, v in scalars.items()}})

  def write_json(self, step: int, record: dict):
    """A record of any JSON values (e.g. a confusion matrix), as one line."""
    self._add({'step': int(step), **record})

  def write_image(self, step: int, tag: str, png: bytes):
    pass

  def flush(self):
    self._file.flush(force=True)

  def close(self):
    self._file.close()


class TensorBoardWriter:
  """Scalars and images as TensorBoard event files in `logdir` (`tensorboard --logdir=...`).

  Event protos in TFRecord framing, written with the `tensorboard` package's
  protos and record writer through `storage.GrowingFile` (local or gs://). Not
  `tensorboard.summary.Writer`: it opens files through `tf.io.gfile`, which
  imports TensorFlow whenever it is installed, and reaches gs:// through
  TensorFlow's own GCS client.

  Each launch starts a new file with a SessionLog START event at `start_step` + 1:
  TensorBoard then discards the events of earlier launches from that step on
  (steps re-run after a resume), so every step shows once. On an object store a
  file is rewritten whole at each flush, so a new file is started after
  `roll_bytes`.

  Why not tensorboardX (2.6.5, read 2026-12-02), which also needs no TensorFlow and
  whose `purge_step` writes the same SessionLog START: its gs:// writer keeps the
  whole file in memory and uploads all of it at every flush, with no size bound (a
  long run's event file is rewritten whole every time, growing without end), and it
  reaches the bucket through its own google-cloud-storage client rather than the
  one path layer (`storage`) that throttles uploads to one per 10 s and flushes
  before every checkpoint; its writes go through a background thread and queue, so
  "durable before the checkpoint" would rest on its flush semantics too. Keeping
  ours costs ~80 lines on tensorboard's own protos and record writer.
  """

  def __init__(self, logdir, start_step: int = 0, roll_bytes: int = 4 << 20):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2, self._summary_pb2, self._record_writer = event_pb2, summary_pb2, RecordWriter
    self._logdir = storage.path(logdir)
    # Rolled over only on object stores, where each flush rewrites the whole file.
    self._roll_bytes = roll_bytes if storage.is_remote(self._logdir) else None
    self._open()
    self._write(event_pb2.Event(wall_time=time.time(), step=int(start_step) + 1,
                                session_log=event_pb2.SessionLog(
                                    status=event_pb2.SessionLog.START)))

  def _open(self):
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
    self._file = storage.GrowingFile(self._logdir / name)
    self._records = self._record_writer(self._file)
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event):
    if self._roll_bytes is not None and len(self._file) > self._roll_bytes:
      self._file.close()
      self._open()
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict):
    """A list (a population's `<name>_members`) becomes one scalar per member,
    `<name>/member_<i>`, so that TensorBoard draws them in one group."""
    flat = {}
    for tag, value in scalars.items():
      if isinstance(value, (list, tuple)):
        base = tag[:-len('_members')] if tag.endswith('_members') else tag
        flat.update({f'{base}/member_{i}': v for i, v in enumerate(value)})
      else:
        flat[tag] = value
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in flat.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._file.flush()

  def write_json(self, step: int, record: dict):
    """The numbers of a record's dict fields as scalars `field/key` (e.g.
    class_accuracy/cat); other fields (a matrix) are for metrics.jsonl and images."""
    scalars = {f'{field}/{k}': v for field, value in record.items() if isinstance(value, dict)
               for k, v in value.items() if isinstance(v, (int, float))}
    if scalars:
      self.write_scalars(step, scalars)

  def write_image(self, step: int, tag: str, png: bytes):
    """A PNG as an image summary (TensorBoard's Images tab)."""
    import struct  # pylint: disable=import-outside-toplevel
    width, height = struct.unpack('>II', png[16:24])  # The PNG IHDR chunk.
    image = self._summary_pb2.Summary.Image(height=height, width=width, colorspace=4,
                                            encoded_image_string=png)
    summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag=tag,
                                                                               image=image)])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._file.flush()

  def flush(self):
    self._file.flush(force=True)

  def close(self):
    self._file.close()


class LoggingWriter:
  """Scalars as one console (absl) line per write."""

  def write_scalars(self, step: int, scalars: dict):
    logging.info('[%d] %s', step, ', '.join(
        f'{k}=[{", ".join(f"{x:.4g}" for x in v)}]' if isinstance(v, (list, tuple))
        else f'{k}={v:.6g}' for k, v in sorted(scalars.items())))

  def write_json(self, step: int, record: dict):
    pass

  def write_image(self, step: int, tag: str, png: bytes):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  def __init__(self, writers):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: dict):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_json(self, step: int, record: dict):
    for w in self._writers:
      w.write_json(step, record)

  def write_image(self, step: int, tag: str, png: bytes):
    for w in self._writers:
      w.write_image(step, tag, png)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_writer(workdir, is_main_process: bool = True, start_step: int = 0) -> MultiWriter:
  """Console everywhere; TensorBoard and metrics.jsonl from the main process only.

  `start_step`: the step this launch resumes from; what earlier launches logged
  after it is dropped (metrics.jsonl) or hidden (TensorBoard), since it is re-run.
  """
  if not is_main_process:
    return MultiWriter([LoggingWriter()])
  writers = [LoggingWriter(), JsonlWriter(workdir, start_step)]
  try:
    writers.append(TensorBoardWriter(workdir, start_step))
  except ImportError as e:
    logging.warning('No TensorBoard events (%s); pip install tensorboard to get them.', e)
  return MultiWriter(writers)
