"""runtime/faults.py: filesystem faults read from any exception, worded as one line."""
import errno
import os

import pytest

from cifar_jax.errors import ResourceError
from cifar_jax.runtime import faults

# What Orbax's asynchronous save raises in the main thread when the disk fills (abridged).
ORBAX_TEXT = ('RESOURCE_EXHAUSTED: Error writing "params.conv.kernel.value/0" in OCDBT database '
              'at local file "/w/checkpoints/20.orbax-checkpoint-tmp/default.orbax-checkpoint-'
              'tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/20.orbax-checkpoint-tmp/'
              'default.orbax-checkpoint-tmp/ocdbt.process_0/d/c2c7": Failed to write 376546 '
              "bytes to file 16: No space left on device [os_error_code='28']")


def test_os_errors_give_their_errno_and_path():
  fault = faults.find(PermissionError(errno.EACCES, 'Permission denied', '/w/metrics.jsonl'))
  assert fault == faults.Fault(errno.EACCES, '/w/metrics.jsonl')
  assert faults.find(FileExistsError(errno.EEXIST, 'File exists', '/w')).code == errno.EEXIST


def test_orbax_text_gives_the_errno_and_the_path_it_failed_writing():
  fault = faults.find(ValueError(ORBAX_TEXT))
  assert fault.code == errno.ENOSPC and fault.no_space
  assert fault.path.startswith('/w/checkpoints/20.orbax-checkpoint-tmp/')


def test_found_anywhere_in_the_chain_and_not_invented():
  try:
    try:
      raise ValueError(ORBAX_TEXT)
    except ValueError as inner:
      raise RuntimeError('Save Finalize thread failed') from inner
  except RuntimeError as outer:
    assert faults.find(outer).code == errno.ENOSPC
  assert faults.find(RuntimeError('shapes do not match')) is None
  assert faults.find(OSError(errno.ECONNRESET, 'Connection reset')) is None


def test_the_line_names_what_where_how_much_what_is_kept_and_the_fix(tmp_path):
  line = faults.describe(faults.Fault(errno.ENOSPC, None), 'saving the checkpoint of step 8',
                         tmp_path, needed_bytes=3 << 20, kept='checkpoint 4 is intact')
  assert line.startswith(f'saving the checkpoint of step 8 failed: {tmp_path}: no space left')
  assert 'it needs about 3.0 MiB, ' in line and ' MiB free)' in line
  assert 'checkpoint 4 is intact' in line and line.endswith('rerun the same command')
  assert '\n' not in line


def test_translated_raises_a_resource_error_and_passes_others():
  with pytest.raises(ResourceError, match=r'^writing x failed: /ro/x: read-only file system'):
    with faults.translated('writing x'):
      raise OSError(errno.EROFS, 'Read-only file system', '/ro/x')
  with pytest.raises(KeyError):
    with faults.translated('writing x'):
      raise KeyError('a bug keeps its traceback')
  assert ResourceError.exit_status == 1


def test_free_bytes_of_a_path_not_yet_there_and_of_object_stores(tmp_path):
  assert faults.free_bytes(tmp_path / 'not' / 'yet') == faults.free_bytes(tmp_path) > 0
  assert faults.free_bytes('gs://bucket/run') is None
  assert os.path.exists(tmp_path) and not os.path.exists(tmp_path / 'not')
