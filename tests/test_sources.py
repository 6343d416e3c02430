"""The archive source on small archives in both official formats; TFDS via mock data."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from cifar_jax.data import sources as data_sources
from cifar_jax.errors import UserError


def _images(n, seed):
  rs = np.random.RandomState(seed)
  return rs.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8), rs.randint(0, 10, n)


def _bin_record(images, labels, coarse=None):
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R, G, B planes.
  cols = [labels[:, None]] if coarse is None else [coarse[:, None], labels[:, None]]
  return np.concatenate(cols + [planes], axis=1).astype(np.uint8).tobytes()


def _py_batch(images, labels, cifar100=False):
  d = {b'batch_label': b'test', b'data': images.transpose(0, 3, 1, 2).reshape(len(images), -1),
       b'filenames': [b'x.png'] * len(images)}
  d[b'fine_labels' if cifar100 else b'labels'] = [int(v) for v in labels]
  if cifar100:
    d[b'coarse_labels'] = [0] * len(images)
  return pickle.dumps(d, protocol=2)


def write_cifar(root, dataset, fmt, as_archive, per_file=7):
  """Writes a tiny official-layout CIFAR download; returns (train, test) truth."""
  if dataset == 'cifar10':
    folder = 'cifar-10-batches-bin' if fmt == 'bin' else 'cifar-10-batches-py'
    train_names = [f'data_batch_{i}' for i in range(1, 6)]
    test_names = ['test_batch']
  else:
    folder = 'cifar-100-binary' if fmt == 'bin' else 'cifar-100-python'
    train_names, test_names = ['train'], ['test']
  files, truth = {}, {}
  for split, names in (('train', train_names), ('test', test_names)):
    parts = []
    for i, name in enumerate(names):
      x, y = _images(per_file, hash((split, i)) % 1000)
      if dataset == 'cifar100':
        y = y * 10 + 3  # Fine labels up to 99.
      parts.append((x, y))
      key = name + ('.bin' if fmt == 'bin' else '')
      if fmt == 'bin':
        files[key] = _bin_record(x, y, None if dataset == 'cifar10' else y // 20)
      else:
        files[key] = _py_batch(x, y, dataset == 'cifar100')
    truth[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  if as_archive:
    archive = {('cifar10', 'bin'): 'cifar-10-binary.tar.gz', ('cifar10', 'py'): 'cifar-10-python.tar.gz',
               ('cifar100', 'bin'): 'cifar-100-binary.tar.gz', ('cifar100', 'py'): 'cifar-100-python.tar.gz'}
    with tarfile.open(os.path.join(root, archive[dataset, fmt]), 'w:gz') as tar:
      for name, blob in files.items():
        info = tarfile.TarInfo(f'{folder}/{name}')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  else:
    os.makedirs(os.path.join(root, folder))
    for name, blob in files.items():
      with open(os.path.join(root, folder, name), 'wb') as f:
        f.write(blob)
  return truth


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('fmt', ['bin', 'py'])
@pytest.mark.parametrize('as_archive', [True, False])
def test_reads_official_layouts(tmp_path, dataset, fmt, as_archive):
  truth = write_cifar(str(tmp_path), dataset, fmt, as_archive)
  for split in ('train', 'test'):
    got = data_sources.from_archive(dataset, split, str(tmp_path))
    np.testing.assert_array_equal(got.images, truth[split][0])
    np.testing.assert_array_equal(got.labels, truth[split][1])
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int32
  assert len(data_sources.from_archive(dataset, 'train', str(tmp_path)).labels) == \
      (35 if dataset == 'cifar10' else 7)


def test_archive_file_path_and_extracted_folder_path_work(tmp_path):
  truth = write_cifar(str(tmp_path), 'cifar10', 'bin', as_archive=True)
  got = data_sources.from_archive('cifar10', 'test', str(tmp_path / 'cifar-10-binary.tar.gz'))
  np.testing.assert_array_equal(got.images, truth['test'][0])
  other = tmp_path / 'x'
  other.mkdir()
  truth = write_cifar(str(other), 'cifar10', 'py', as_archive=False)
  got = data_sources.from_archive('cifar10', 'test', str(other / 'cifar-10-batches-py'))
  np.testing.assert_array_equal(got.labels, truth['test'][1])


def test_missing_data_names_the_files_and_the_fix(tmp_path):
  with pytest.raises(UserError, match='cifar-10-binary.tar.gz.*data_source=synthetic'):
    data_sources.from_archive('cifar10', 'train', str(tmp_path))


class _Evil:

  def __reduce__(self):
    return (os.system, ('echo pwned > /dev/null',))


def test_python_batches_refuse_arbitrary_objects(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    (folder / name).write_bytes(pickle.dumps({b'data': _Evil(), b'labels': [1]}))
  with pytest.raises(UserError, match='refusing to load'):
    data_sources.from_archive('cifar10', 'test', str(tmp_path))


def test_tar_members_outside_the_target_are_refused(tmp_path):
  with tarfile.open(tmp_path / 'cifar-10-binary.tar.gz', 'w:gz') as tar:
    blob = b'\0' * 3073
    info = tarfile.TarInfo('../../etc/evil')
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))
  with pytest.raises(UserError, match='unsafe member path'):
    data_sources.from_archive('cifar10', 'test', str(tmp_path))
  assert not os.path.exists(tmp_path.parent.parent / 'etc' / 'evil')


def test_corrupted_files_give_a_clear_error(tmp_path):
  write_cifar(str(tmp_path), 'cifar10', 'bin', as_archive=False)
  with open(tmp_path / 'cifar-10-batches-bin' / 'test_batch.bin', 'ab') as f:
    f.write(b'garbage')
  with pytest.raises(UserError, match='test_batch.bin is corrupted'):
    data_sources.from_archive('cifar10', 'test', str(tmp_path))
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'cifar-10-binary.tar.gz').write_bytes(b'not a tar')
  with pytest.raises(UserError, match='not a readable'):
    data_sources.from_archive('cifar10', 'test', str(tmp_path / 'broken'))


def test_synthetic_is_deterministic_and_shaped_like_cifar():
  a = data_sources.synthetic('cifar100', 'train', seed=3, num_examples=100)
  b = data_sources.synthetic('cifar100', 'train', seed=3, num_examples=100)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (100, 32, 32, 3) and a.labels.max() < 100
  assert len(data_sources.synthetic('cifar10', 'test', num_examples=100).labels) == 20
  assert len(data_sources.synthetic('cifar10', 'test').labels) == 10_000


@pytest.mark.tensorflow  # the host pipeline or the tfds source
def test_tfds_source_through_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    split = data_sources.from_tfds('cifar10', 'train', '')
  assert split.images.shape == (12, 32, 32, 3) and split.images.dtype == np.uint8
  assert split.labels.shape == (12,) and split.labels.dtype == np.int32


@pytest.mark.tensorflow  # the host pipeline or the tfds source
def test_tfds_without_data_or_network_fails_fast_with_the_alternatives(tmp_path, monkeypatch):
  monkeypatch.setattr(data_sources, '_network_reachable', lambda *a, **k: False)
  with pytest.raises(UserError, match='data_source=archive'):
    data_sources.from_tfds('cifar10', 'train', str(tmp_path))
