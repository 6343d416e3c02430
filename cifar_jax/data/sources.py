"""Where the images come from: TFDS, the official CIFAR archives, or synthetic data.

Each source returns a whole split as host numpy arrays (CIFAR fits in memory):
images uint8 [N, 32, 32, 3] and labels int32 [N]. Only the `tfds` source
imports TensorFlow; `archive` and `synthetic` are pure numpy. `data_dir` may be
local or gs:// (read through `storage`, never TensorFlow's own GCS client).
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import pickle
import socket
import tarfile
import tempfile

import numpy as np

from cifar_jax.data.cifar import NUM_CLASSES, SPLIT_SIZES, Split
from cifar_jax.errors import UserError
from cifar_jax.runtime import storage

SOURCES = ('tfds', 'archive', 'synthetic')


def load(config, split: str) -> Split:
  """Loads `split` ('train' or 'test') of `config.dataset` from `config.data_source`."""
  if config.data_source == 'synthetic':
    # One fixed dataset, as a real one is, whatever `config.seed`: runs with other seeds (a
    # population's members among them) train on the same examples.
    return synthetic(config.dataset, split, 0, config.num_synthetic_examples)
  if config.data_source == 'archive':
    return from_archive(config.dataset, split, config.data_dir)
  if config.data_source == 'tfds':
    return from_tfds(config.dataset, split, config.data_dir)
  raise UserError(f'config.data_source={config.data_source!r} is unknown; '
                  f'use one of {", ".join(SOURCES)}')


# --- synthetic -----------------------------------------------------------------
def synthetic(dataset: str, split: str, seed: int = 0, num_examples: int = 0) -> Split:
  """Deterministic random images whose mean colour depends on the label (learnable).

  `num_examples` (0 = the real sizes) sets the train split; the test split is
  then a fifth of it, as CIFAR's 50,000/10,000.
  """
  n = SPLIT_SIZES[split]
  if num_examples:
    n = num_examples if split == 'train' else max(num_examples // 5, 1)
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  labels = rng.integers(0, NUM_CLASSES[dataset], n).astype(np.int32)
  palette = np.random.default_rng(1234).integers(40, 216, (NUM_CLASSES[dataset], 1, 1, 3))
  noise = rng.integers(-40, 40, (n, 32, 32, 3), dtype=np.int16)
  return Split((palette[labels] + noise).clip(0, 255).astype(np.uint8), labels)


# --- official archives ---------------------------------------------------------
# (folder inside the archive, archive name, member names per split, format)
_LAYOUTS = {
    'cifar10': [
        ('cifar-10-batches-bin', 'cifar-10-binary.tar.gz',
         {'train': [f'data_batch_{i}.bin' for i in range(1, 6)], 'test': ['test_batch.bin']}, 'bin'),
        ('cifar-10-batches-py', 'cifar-10-python.tar.gz',
         {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}, 'py'),
    ],
    'cifar100': [
        ('cifar-100-binary', 'cifar-100-binary.tar.gz',
         {'train': ['train.bin'], 'test': ['test.bin']}, 'bin'),
        ('cifar-100-python', 'cifar-100-python.tar.gz',
         {'train': ['train'], 'test': ['test']}, 'py'),
    ],
}


def from_archive(dataset: str, split: str, data_dir: str) -> Split:
  """Reads the official CIFAR download: the .tar.gz itself or its extracted folder.

  Archives are read member by member in memory and never extracted, so no
  member path can write anywhere; suspicious member paths are refused anyway.
  """
  if not data_dir:
    raise UserError('config.data_dir is empty; set --config.data_dir to the folder holding '
                    f'{_LAYOUTS[dataset][0][1]} (or its extracted folder)')
  root = storage.path(data_dir)
  for folder, archive, members, fmt in _LAYOUTS[dataset]:
    names = members[split]
    for candidate in (root / folder, root):
      if candidate.is_dir() and all((candidate / n).is_file() for n in names):
        return _decode(dataset, fmt, [(n, (candidate / n).read_bytes()) for n in names],
                       str(candidate))
    for candidate in (root / archive, root):
      if candidate.name == archive and candidate.is_file():
        return _decode(dataset, fmt, _read_tar_members(candidate, folder, names), str(candidate))
  expected = ', '.join(f'{a} or {f}/' for f, a, _, _ in _LAYOUTS[dataset])
  raise UserError(f'config.data_dir={data_dir!r} holds no {dataset} data; put one of {expected} '
                  'there (from https://www.cs.toronto.edu/~kriz/cifar.html), '
                  'or use --config.data_source=synthetic')


def _read_tar_members(path, folder: str, names: list[str]) -> list[tuple[str, bytes]]:
  wanted = {f'{folder}/{n}': n for n in names}
  found = {}
  try:
    with path.open('rb') as f, tarfile.open(fileobj=f, mode='r:*') as tar:
      for member in tar:
        name = member.name
        if name.startswith(('/', '\\')) or '..' in name.replace('\\', '/').split('/'):
          raise UserError(f'{path}: unsafe member path {name!r}; the archive is not an official '
                          'CIFAR download, get a fresh copy')
        name = name[2:] if name.startswith('./') else name
        if name in wanted and member.isfile():
          found[wanted[name]] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    raise UserError(f'{path} is not a readable .tar.gz ({e}); download it again') from None
  missing = [n for n in names if n not in found]
  if missing:
    raise UserError(f'{path} lacks {folder}/{missing[0]}; it is incomplete, download it again')
  return [(n, found[n]) for n in names]


def _decode(dataset: str, fmt: str, blobs: list[tuple[str, bytes]], where: str) -> Split:
  images, labels = [], []
  for name, blob in blobs:
    try:
      x, y = (_decode_bin if fmt == 'bin' else _decode_py)(dataset, blob)
    except (ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
      raise UserError(f'{where}: {name} is corrupted ({e}); download the archive again') from None
    images.append(x)
    labels.append(y)
  return Split(np.concatenate(images), np.concatenate(labels).astype(np.int32))


def _decode_bin(dataset: str, blob: bytes):
  label_bytes = 1 if dataset == 'cifar10' else 2  # CIFAR-100: coarse, then fine label.
  record = label_bytes + 3072
  if len(blob) % record:
    raise ValueError(f'size {len(blob)} is not a multiple of the {record}-byte record')
  rows = np.frombuffer(blob, np.uint8).reshape(-1, record)
  images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), rows[:, label_bytes - 1].astype(np.int32)


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits only what a CIFAR python batch contains: builtins and numpy arrays."""
  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy', 'ndarray'), ('numpy', 'dtype'), ('copyreg', '_reconstructor'),
      ('builtins', 'object'), ('_codecs', 'encode'),  # Python 3 protocol-2 bytes.
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a CIFAR batch')


def _decode_py(dataset: str, blob: bytes):
  batch = _RestrictedUnpickler(io.BytesIO(blob), encoding='bytes').load()
  if not isinstance(batch, dict):
    raise TypeError('a CIFAR python batch is a dict')
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  data = np.asarray(batch['data'], np.uint8)
  labels = batch['labels' if dataset == 'cifar10' else 'fine_labels']
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(labels, np.int32)
  if len(labels) != len(images):
    raise ValueError(f'{len(images)} images but {len(labels)} labels')
  return np.ascontiguousarray(images), labels


# --- TFDS ----------------------------------------------------------------------
def import_tensorflow():
  """Imports TensorFlow for the host input pipeline only, hiding accelerators from it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialized, or no such kind.
      pass
  return tf


def _network_reachable(host='storage.googleapis.com', port=443, timeout=3.0) -> bool:
  """True if `host` answers within `timeout` seconds (DNS included)."""
  def connect():
    with socket.create_connection((host, port), timeout=timeout):
      return True
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    return pool.submit(connect).result(timeout=timeout + 1)
  except Exception:  # pylint: disable=broad-except
    return False
  finally:
    pool.shutdown(wait=False)


def _stage_tfds(dataset: str, split: str, data_dir: str, local_dir: str) -> None:
  """Copies the prepared `dataset` (its newest version: metadata and `split`'s shards)
  from the object store `data_dir` into `local_dir`, in the same layout.

  tf.data would read gs:// through TensorFlow's own GCS client, which has its own
  credentials and endpoints (no emulator, no private endpoint). CIFAR splits are read
  whole into memory anyway, so a copy costs the same bytes.
  """
  root = storage.path(data_dir) / dataset
  versions = sorted((v for v in (root.iterdir() if root.is_dir() else [])
                     if (v / 'dataset_info.json').exists()),
                    key=lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.name.split('.')))
  if not versions:
    raise FileNotFoundError(f'no prepared {dataset} in {root}')
  source = versions[-1]
  names = [c.name for c in source.iterdir()
           if '.tfrecord' not in c.name or c.name.startswith(f'{dataset}-{split}.tfrecord')]
  storage.copy_files(source, os.path.join(local_dir, dataset, source.name), sorted(names))


def from_tfds(dataset: str, split: str, data_dir: str) -> Split:
  """`tfds.load` from `data_dir` (TFDS's default when empty: TFDS_DATA_DIR or
  ~/tensorflow_datasets); downloads only when online. A gs:// data_dir is staged into a
  temporary local directory first (`_stage_tfds`)."""
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR', '')
  if storage.is_remote(data_dir):
    with tempfile.TemporaryDirectory(prefix='cifar_jax_tfds_') as local:
      try:
        _stage_tfds(dataset, split, data_dir, local)
      except FileNotFoundError as e:
        raise UserError(f'{e}; prepare it there once from a machine with network: python -c '
                        f'"import tensorflow_datasets as tfds; tfds.builder(\'{dataset}\', '
                        f'data_dir=\'{data_dir}\').download_and_prepare()"') from None
      return from_tfds(dataset, split, local)
  import_tensorflow()  # Before TFDS imports it: hides accelerators from TensorFlow.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=split, data_dir=data_dir or None, as_supervised=True)
  try:
    ds = tfds.load(dataset, download=False, **kwargs)
  except Exception as not_prepared:  # pylint: disable=broad-except
    if not _network_reachable():
      raise UserError(
          f'TFDS has no prepared {dataset} in data_dir={data_dir or "(TFDS default)"} and there is '
          'no network to download it; use --config.data_source=archive with '
          '--config.data_dir=<folder with the CIFAR .tar.gz>, or data_source=synthetic') from None
    try:
      ds = tfds.load(dataset, download=True, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'tfds.load({dataset!r}) failed ({e}); use --config.data_source=archive '
                      'or synthetic') from not_prepared
  # Batched reads (batch_size=-1 aborts under tfds.testing.mock_data).
  chunks = list(tfds.as_numpy(ds.batch(10_000)))
  return Split(np.concatenate([c[0] for c in chunks]).astype(np.uint8),
               np.concatenate([c[1] for c in chunks]).astype(np.int32))
