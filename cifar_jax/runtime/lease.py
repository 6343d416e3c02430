"""One writer per workdir: a training run holds a lease on its workdir while it may write.

Two runs writing one workdir interleave checkpoints and rewrite `metrics.jsonl` under
each other. So `acquire(workdir)` either returns a `Lease` or raises `ResourceError`
naming the run that holds it and how to take over. `--mode=eval/predict/export/report`
only read and take none.

* **Local workdir**: `WORKDIR/lease.json`, locked with `fcntl.lockf` (a POSIX record
  lock: NFSv4 honours it). The kernel drops the lock when its process ends, however it
  ends (SIGKILL, OOM, a crash), so a dead holder never blocks the next launch; its
  record is still in the file, so that launch says whose lease it takes over.
* **gs://**: object stores have no locks, but a write can be made conditional on the
  object's generation. The lease is the object `WORKDIR/lease.json`, created only if
  absent, rewritten every `timeout_s / 5` seconds only if it is still the generation
  this run wrote (the heartbeat), deleted at the end the same way. A launch that finds
  it takes it over (conditionally on the generation it read, so of two such launches
  one wins) if the holder is gone: a process of this very host that no longer exists,
  or a heartbeat older than `timeout_s` (compared with this host's clock; cloud VMs
  keep theirs synchronized to well under that). A holder whose heartbeat finds another
  generation has lost the lease; `Lease.check()` then raises, before its next write.

A lease records the holder's host, pid, start time and command; on Linux also the
boot id and the process's start tick, so that a reused pid is not taken for the holder.
The lease is this module's own: fcntl and google-cloud-storage's preconditions are the
primitives, and no library we use offers a workdir lease on both.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from absl import logging

from cifar_jax.errors import ResourceError

DEFAULT_TIMEOUT_S = 300.0
NAME = 'lease.json'


def holder_record() -> dict:
  """Who this process is, as a lease records it."""
  now = time.time()
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'boot_id': _boot_id(),
          'pid_start': _pid_start(os.getpid()),
          'started': datetime.datetime.fromtimestamp(now).astimezone().isoformat(
              timespec='seconds'),
          'heartbeat_unix': now, 'command': ' '.join(sys.argv)[:500]}


def _boot_id() -> str | None:
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def is_gone(holder: dict) -> bool:
  """Whether `holder` is a process of this host (this boot) that no longer exists. A
  process of another host is never known to be gone here (its heartbeat tells)."""
  if holder.get('host') != socket.gethostname():
    return False
  if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
    return True  # This host rebooted since.
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # Exists, another user's.
  return bool(holder.get('pid_start') and _pid_start(pid) not in (None, holder['pid_start']))


def _describe(holder: dict) -> str:
  command = holder.get('command', '?')
  command = command if len(command) <= 80 else command[:79] + '…'
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
          f'{command}')


def _warn_takeover(verb: str, workdir: str, previous: dict) -> None:
  """The one warning of a takeover ('taking' or 'took'), on stderr and in the log."""
  line = f'{verb} over the workdir lease of a run that is gone ({_describe(previous)})'
  logging.warning('%s: %s', workdir, line)
  print(f'warning: {line}', file=sys.stderr, flush=True)


def _parse(data: bytes) -> dict | None:
  """The holder a lease file names; None if it names none (empty: released)."""
  if not data.strip():
    return None
  try:
    holder = json.loads(data.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return {}  # Unreadable: a torn write of a holder that is gone.
  return holder if isinstance(holder, dict) else {}


class Lease:
  """A held lease; `release()` (or the `with` block's end) gives it back. This base class
  is the handle of a process that holds none itself (processes > 0 of a multi-process
  run: process 0 holds the run's lease)."""

  path: str | None = None

  def check(self) -> None:
    """Raises ResourceError if the lease was taken over by another run."""

  def release(self) -> None:
    """Gives the lease back."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


class _LocalLease(Lease):

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, NAME)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      previous = _parse(os.pread(self._fd, 1 << 16, 0)) or {}
      os.close(self._fd)
      if e.errno in (errno.EACCES, errno.EAGAIN):
        raise ResourceError(
            f'{workdir} is in use by another run ({_describe(previous)}); two runs cannot '
            'share a workdir. Wait for it to end, stop it (kill '
            f"{previous.get('pid')} on {previous.get('host')}) and rerun this command to "
            'resume, or pick another --workdir') from None
      raise ResourceError(f'cannot lock {self.path} ({e.strerror}): this file system has no '
                          'POSIX locks; put the workdir on a local disk, NFSv4 or gs://') from e
    previous = _parse(os.pread(self._fd, 1 << 16, 0))
    if previous is not None:
      _warn_takeover('taking', workdir, previous)
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(holder_record()).encode('utf-8'), 0)
    os.fsync(self._fd)

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # Empty: nobody holds it (the file stays: see _LocalLease).
    os.close(self._fd)  # Also drops the lock.
    self._fd = None


class _ObjectLease(Lease):
  """The gs:// lease (module docstring), through google-cloud-storage's preconditions."""

  def __init__(self, workdir: str, timeout_s: float):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
    self._precondition_failed = exceptions.PreconditionFailed
    raced = (exceptions.PreconditionFailed, exceptions.NotFound)
    self.path = f'{workdir.rstrip("/")}/{NAME}'
    bucket_name, _, self._name = self.path[len('gs://'):].partition('/')
    self._bucket = gcs.Client().bucket(bucket_name)
    self._timeout_s = timeout_s
    self._lost = None
    self._stop = threading.Event()
    for _ in range(5):  # Another launch may change the object between our read and write.
      blob = self._bucket.get_blob(self._name)
      try:
        if blob is not None:
          previous = _parse(blob.download_as_bytes(if_generation_match=blob.generation)) or {}
          age = time.time() - blob.updated.timestamp()
          if not is_gone(previous) and age < timeout_s:
            raise ResourceError(
                f'{workdir} is in use by another run ({_describe(previous)}; its last '
                f'heartbeat {age:.0f} s ago); two runs cannot share a workdir. Wait for it to '
                'end or stop it, then rerun this command to resume (if it was killed on '
                f'another host, its lease expires {timeout_s - age:.0f} s from now, or sooner '
                'with a lower --lease_timeout_s), or pick another --workdir')
        self._write(0 if blob is None else blob.generation)
      except raced:
        continue
      if blob is not None:
        _warn_takeover('took', workdir, previous)
      break
    else:
      raise ResourceError(f'{self.path} keeps changing: another run is taking this workdir; '
                          'pick another --workdir')
    self._thread = threading.Thread(target=self._heartbeat, name='workdir_lease', daemon=True)
    self._thread.start()

  def _write(self, expected_generation: int) -> None:
    blob = self._bucket.blob(self._name)
    blob.upload_from_string(json.dumps(holder_record()), content_type='application/json',
                            if_generation_match=expected_generation)
    self._generation = blob.generation

  def _heartbeat(self) -> None:
    while not self._stop.wait(self._timeout_s / 5):
      try:
        self._write(self._generation)
      except self._precondition_failed:
        blob = self._bucket.get_blob(self._name)
        self._lost = (_parse(blob.download_as_bytes()) or {}) if blob is not None else {}
        logging.error('Lost the lease of %s to %s.', self.path, _describe(self._lost))
        return
      except Exception as e:  # pylint: disable=broad-except  # The network; try again.
        logging.warning('Lease heartbeat of %s failed (%s); retrying.', self.path, e)

  def check(self) -> None:
    if self._lost is not None:
      raise ResourceError(f'another run took over this workdir ({_describe(self._lost)}), so '
                          'this one stopped before writing more; only one run may write '
                          f'{self.path.rsplit("/", 1)[0]}')

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()
    if self._lost is None:
      try:
        self._bucket.delete_blob(self._name, if_generation_match=self._generation)
      except Exception as e:  # pylint: disable=broad-except  # Gone or taken: not ours now.
        logging.warning('Could not release the lease %s (%s).', self.path, e)


class _NoLease(Lease):

  def __init__(self, workdir: str):
    self.path = workdir
    logging.warning('No workdir lease on %s (leases: local paths and gs://): nothing stops '
                    'a second run from writing there.', workdir)

  def release(self) -> None:
    pass


def acquire(workdir: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Lease:
  """The lease of `workdir` (a local directory that exists, or gs://...), or ResourceError."""
  workdir = os.fspath(workdir)
  if workdir.startswith('gs://'):
    return _ObjectLease(workdir, timeout_s)
  if '://' in workdir:
    return _NoLease(workdir)
  return _LocalLease(workdir)
