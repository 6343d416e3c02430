"""Metric writers: console, TensorBoard events and `metrics.jsonl`; a progress line.

`metrics.jsonl` holds one JSON object per line, {"step": N, "<metric>": value,
...}, so runs can be compared with nothing but the standard library.

TensorBoard events are written with the `tensorboard` package's protos, not
clu's writers, tf.summary or `tensorboard.summary.Writer`: all of them import
TensorFlow, which a training run must not need (GPU images commonly ship JAX
without it) nor pay for when it is installed.
"""
from __future__ import annotations

import json
import os
import socket
import time

from absl import logging


class JsonlWriter:
  """Appends scalars to `<workdir>/metrics.jsonl`, one line per write."""

  def __init__(self, path: str):
    self._file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: dict):
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_json(self, step: int, record: dict):
    """A record of any JSON values (e.g. a confusion matrix), as one line."""
    self._file.write(json.dumps({'step': int(step), **record}) + '\n')
    self._file.flush()

  def write_image(self, step: int, tag: str, png: bytes):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class TensorBoardWriter:
  """Scalars as a TensorBoard event file in `logdir` (`tensorboard --logdir=...`).

  Event protos in TFRecord framing, written with the `tensorboard` package's
  protos and record writer to a plain file. Not `tensorboard.summary.Writer`:
  it opens files through `tf.io.gfile`, which imports TensorFlow whenever it
  is installed.
  """

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
    self._file = open(os.path.join(logdir, name), 'ab')  # pylint: disable=consider-using-with
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict):
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in scalars.items()])
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
    self._file.flush()

  def close(self):
    self._file.close()


class LoggingWriter:
  """Scalars as one console (absl) line per write."""

  def write_scalars(self, step: int, scalars: dict):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in sorted(scalars.items())))

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


def create_writer(workdir: str, is_main_process: bool = True) -> MultiWriter:
  """Console everywhere; TensorBoard and metrics.jsonl from the main process only."""
  if not is_main_process:
    return MultiWriter([LoggingWriter()])
  writers = [LoggingWriter(), JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))]
  try:
    writers.append(TensorBoardWriter(workdir))
  except ImportError as e:
    logging.warning('No TensorBoard events (%s); pip install tensorboard to get them.', e)
  return MultiWriter(writers)


class ProgressReporter:
  """Logs `step N/T (x%), steps/sec, ETA` at most every `every_secs` seconds."""

  def __init__(self, start_step: int, total_steps: int, every_secs: float = 30.0):
    self._total = total_steps
    self._every = every_secs
    self._last_step, self._last_time = start_step, time.perf_counter()

  def __call__(self, step: int):
    now = time.perf_counter()
    if now - self._last_time < self._every and step != self._total:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float('inf')
    logging.info('Step %d/%d (%.1f%%): %.2f steps/sec, ETA %.1f min', step, self._total,
                 100.0 * step / self._total, rate, eta / 60)
    self._last_step, self._last_time = step, now
