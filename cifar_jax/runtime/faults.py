"""Faults of the filesystem (no space, no permission, a path of the wrong kind) read from
any exception, so that each becomes one `error:` line naming the path and the fix.

Python reports them as `OSError` with an errno and a path. Orbax's asynchronous save
does not: TensorStore's failure reaches the main thread as a `ValueError` whose text
holds the errno (`RESOURCE_EXHAUSTED: ... Failed writing: "PATH" ... No space left on
device [os_error_code='28']`), wrapped in Orbax's own exceptions. `find(exc)` reads
both, anywhere in the exception's chain; `describe` words the line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil

from cifar_jax.errors import ResourceError

# errno -> (what happened, the fix). Only what the user (or their admin) can fix.
_KINDS = {
    errno.ENOSPC: ('no space left on the device', 'free some space there (or move the run to '
                   'a larger disk) and rerun the same command'),
    errno.EDQUOT: ('disk quota exceeded', 'free some space or raise the quota, then rerun the '
                   'same command'),
    errno.EACCES: ('permission denied', 'pick a path you may write, or change its permissions'),
    errno.EPERM: ('operation not permitted', 'pick a path you may write, or change its '
                  'permissions'),
    errno.EROFS: ('read-only file system', 'pick a path on a writable file system'),
    errno.ENOTDIR: ('a part of the path is a file, not a directory', 'pick another path, or '
                    'move that file away'),
    errno.EEXIST: ('it exists and is not a directory', 'pick another path, or move that file '
                   'away'),
    errno.EISDIR: ('it is a directory, not a file', 'pick a file name'),
    errno.ENOENT: ('no such file or directory', 'check the path'),
}
# Words of TensorStore's and Orbax's messages when no errno is given.
_TEXT = (('No space left on device', errno.ENOSPC), ('Disk quota exceeded', errno.EDQUOT),
         ('Permission denied', errno.EACCES), ('Read-only file system', errno.EROFS),
         ('Not a directory', errno.ENOTDIR))
_TEXT_PATH = re.compile(r'(?:Failed writing|local file|opening|creating)[^"]*"([^"]+)"')


@dataclasses.dataclass(frozen=True)
class Fault:
  code: int  # An errno of _KINDS.
  path: str | None

  @property
  def no_space(self) -> bool:
    return self.code in (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def find(exc: BaseException) -> Fault | None:
  """The filesystem fault behind `exc` (or any exception it was raised from), or None."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _KINDS:
      where = e.filename2 or e.filename  # A rename's failure is about its target.
      return Fault(e.errno, os.fspath(where) if where is not None else None)
    text = str(e)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code and int(code.group(1)) in _KINDS:
      found = int(code.group(1))
    else:
      found = next((c for words, c in _TEXT if words in text), None)
    if found is not None:
      where = _TEXT_PATH.search(text)
      return Fault(found, where.group(1) if where else None)
  return None


def describe(fault: Fault, what: str | None = None, path=None, needed_bytes: int | None = None,
             kept: str | None = None) -> str:
  """The one line: `what` failed at the path (the fault's own, else `path`), why, how much
  space it needs (for no space, if known), what was `kept`, and the fix."""
  problem, fix = _KINDS[fault.code]
  where = fault.path or (os.fspath(path) if path is not None else None)
  line = (f'{what} failed: ' if what else '') + (f'{where}: ' if where else '') + problem
  if fault.no_space:
    free = free_bytes(where) if where else None
    amounts = [f'it needs about {mib(needed_bytes)}' if needed_bytes else '',
               f'{mib(free)} free' if free is not None else '']
    if any(amounts):
      line += ' (' + ', '.join(a for a in amounts if a) + ')'
  if kept:
    line += f'; {kept}'
  return f'{line}; {fix}'


def free_bytes(p) -> int | None:
  """Free bytes of the local file system that holds `p` (or would: its nearest existing
  parent); None for object stores, which have no such limit."""
  p = os.fspath(p)
  if '://' in p:
    return None
  p = os.path.abspath(os.path.expanduser(p))
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    return shutil.disk_usage(p).free
  except OSError:
    return None


def mib(nbytes: int) -> str:
  return f'{nbytes / 2**20:.1f} MiB'


@contextlib.contextmanager
def translated(what: str, path=None, needed_bytes: int | None = None, kept=None):
  """Turns a filesystem fault raised inside into ResourceError (`describe`'s line); any
  other exception passes unchanged. `kept`: a string, or a callable giving one then."""
  try:
    yield
  except ResourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax wraps OSErrors in many kinds.
    fault = find(e)
    if fault is None:
      raise
    raise ResourceError(describe(fault, what, path, needed_bytes,
                                 kept() if callable(kept) else kept)) from e
