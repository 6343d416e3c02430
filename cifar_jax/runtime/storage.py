"""Where a run's files live: local paths and object stores (`gs://`) through one path type.

Every workdir and data path goes through `etils.epath`, the path type Orbax itself
uses. A local path behaves as it always did. A `gs://bucket/...` path is read and
written by gcsfs and google-cloud-storage (Orbax's arrays by TensorStore), not by
TensorFlow's own GCS client: main.py sets `EPATH_USE_TF=false` unless you set it
(code that imports cifar_jax without main.py sets it itself, before its first path:
etils caches the choice; otherwise, with TensorFlow installed, gs:// goes through
TensorFlow, which works on GCS but cannot be pointed at an emulator).
That gives one set of credentials, no TensorFlow import in a loop that does not need
it, and one place to point every byte at an emulator or a private endpoint
(`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`).

Object stores have no append and no rename, but replace an object atomically. So a
file that is written whole (config.json, report.png, a bundle file) is one upload
(`write_whole`; locally a temporary file renamed over it), and a file that grows
(metrics.jsonl, TensorBoard events) is a `GrowingFile`: appended locally, and on an
object store kept in memory and uploaded whole at each flush.
"""
from __future__ import annotations

import concurrent.futures
import os
import time

from etils import epath


def is_remote(p) -> bool:
  """True for object-store URLs (gs://, s3://, ...): no append, no rename, no directories."""
  return '://' in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path; a local one with ~ expanded and made absolute."""
  p = os.fspath(p)
  return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.path.expanduser(p)))


def makedirs(p) -> None:
  """Creates a local directory (and its parents); object stores have none to create."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def write_whole(p, data: bytes | str) -> None:
  """Replaces the file `p` with `data` atomically: readers see the old or the new file,
  never a part. Locally a temporary file renamed over it; on an object store one upload."""
  p = path(p)
  if isinstance(data, str):
    data = data.encode('utf-8')
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f'{p.name}.tmp.{os.getpid()}')
  try:
    tmp.write_bytes(data)
    os.replace(tmp, p)
  except OSError:
    tmp.unlink(missing_ok=True)  # No half-written file left behind (e.g. the disk is full).
    raise


def read_text(p) -> str | None:
  """The text of `p`, or None if it does not exist."""
  p = path(p)
  try:
    return p.read_text(encoding='utf-8')
  except FileNotFoundError:
    return None


def has_step_dirs(p) -> bool:
  """Whether the directory `p` holds a numbered (checkpoint step) entry."""
  p = path(p)
  try:
    return any(child.name.isdigit() for child in p.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return False


def copy_files(src, dst, names: list[str] | None = None, threads: int = 8) -> list[str]:
  """Copies the files `names` (default: every file) of directory `src` into `dst`, either
  side local or remote, in parallel; not recursive. Returns the names copied."""
  src, dst = path(src), path(dst)
  if names is None:
    names = sorted(child.name for child in src.iterdir() if child.is_file())
  makedirs(dst)

  def copy(name):
    (dst / name).write_bytes((src / name).read_bytes())

  with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
    list(pool.map(copy, names))
  return names


def upload_tree(local_dir: str, dst) -> int:
  """Copies the local directory tree `local_dir` under `dst`; returns the file count."""
  count = 0
  for root, _, files in os.walk(local_dir):
    relative = os.path.relpath(root, local_dir)
    target = path(dst) if relative == '.' else path(dst) / relative
    copy_files(root, target, sorted(files))
    count += len(files)
  return count


class GrowingFile:
  """A file written by appending, whose appended bytes are durable at each `flush()`.

  Locally: a file opened for appending, flushed to the OS at each flush (a killed
  process loses nothing it flushed). On an object store, which cannot append: the
  whole content is kept in memory and uploaded as one object at a flush, at most
  every `remote_interval_s` seconds unless the flush is forced (before a checkpoint,
  at the end), since each upload rewrites everything written so far.

  `initial`: the file's content to start from (it replaces the file); None appends
  to what a local file already holds, or starts an empty object.
  """

  def __init__(self, p, initial: bytes | None = None, remote_interval_s: float = 10.0):
    self.path = path(p)
    self._remote = is_remote(self.path)
    self._interval = remote_interval_s
    self._last_upload = -float('inf')  # The first flush uploads at once.
    if self._remote:
      self._data = bytearray(initial or b'')
      self._dirty = True  # Its first flush creates the object (an empty one included).
      return
    if initial is not None:
      write_whole(self.path, initial)
    else:
      makedirs(self.path.parent)
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self._remote:
      self._data += data
      self._dirty = True
    else:
      self._file.write(data)

  def rewrite(self, data: bytes) -> None:
    """Replaces the whole content (atomically, as `write_whole`) and flushes."""
    if self._remote:
      self._data = bytearray(data)
      self._dirty = True
      self.flush(force=True)
      return
    self._file.close()
    write_whole(self.path, data)
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with

  def __len__(self) -> int:
    return len(self._data) if self._remote else self._file.tell()

  def flush(self, force: bool = False) -> None:
    if not self._remote:
      self._file.flush()
      return
    if not self._dirty or (not force and time.monotonic() - self._last_upload < self._interval):
      return
    self.path.write_bytes(bytes(self._data))
    self._dirty = False
    self._last_upload = time.monotonic()

  def close(self) -> None:
    self.flush(force=True)
    if not self._remote:
      self._file.close()
