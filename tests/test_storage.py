"""cifar_jax/runtime/storage.py on local paths and on gs:// (fake-gcs-server on 127.0.0.1:
conftest's `gcs`).

Files written whole and growing files, CIFAR data (archive and TFDS), predict inputs and
checkpoint commits in a bucket. metrics.jsonl and events on gs:// are in
test_metric_logging.py; the full gs:// training run (preempted, resumed, evaluated) in
test_fault_tolerance.py.
"""
import io
import os

import numpy as np
import pytest
from etils import epath
from test_sources import write_cifar

from cifar_jax.data import sources as data_sources
from cifar_jax.runtime import storage
from cifar_jax.serving import images as serving_images

def test_write_whole_replaces_the_file_and_leaves_nothing_else(root):
  target = storage.path(root) / 'config.json'
  assert storage.read_text(target) is None
  storage.write_whole(target, '{"a": 1}\n')
  storage.write_whole(target, b'{"a": 2}\n')
  assert storage.read_text(target) == '{"a": 2}\n'
  assert [p.name for p in storage.path(root).iterdir()] == ['config.json']  # No temporaries.


def test_growing_file_is_durable_at_each_flush_and_throttled_on_object_stores(root):
  target = storage.path(root) / 'log'
  grown = storage.GrowingFile(target, b'kept\n', remote_interval_s=3600)
  grown.write(b'a\n')
  grown.flush()  # Locally: appended. gs://: the first flush uploads.
  assert target.read_bytes() == b'kept\na\n'
  grown.write(b'b\n')
  grown.flush()  # gs://: within the interval, nothing is uploaded...
  assert target.read_bytes() == (b'kept\na\nb\n' if root.startswith('/') else b'kept\na\n')
  grown.flush(force=True)  # ...until a forced flush (before a checkpoint, at the end).
  assert target.read_bytes() == b'kept\na\nb\n'
  grown.rewrite(b'new\n')
  grown.write(b'c\n')
  grown.close()
  assert target.read_bytes() == b'new\nc\n'
  again = storage.GrowingFile(target)  # No `initial`: appends locally; an object restarts.
  again.write(b'd\n')
  again.close()
  assert target.read_bytes() == (b'new\nc\nd\n' if root.startswith('/') else b'd\n')


def test_archive_data_from_gs_equals_local(gcs, tmp_path):
  truth = write_cifar(str(tmp_path), 'cifar10', 'bin', as_archive=True)
  bucket = gcs.create_bucket('cifar-archive')
  storage.copy_files(tmp_path, f'gs://{bucket}/data', ['cifar-10-binary.tar.gz'])
  for split in ('train', 'test'):
    got = data_sources.from_archive('cifar10', split, f'gs://{bucket}/data')
    np.testing.assert_array_equal(got.images, truth[split][0])
    np.testing.assert_array_equal(got.labels, truth[split][1])


@pytest.mark.tensorflow  # the host pipeline or the tfds source
def test_tfds_data_from_gs_equals_local(gcs, tmp_path, monkeypatch):
  """A tiny TFDS-prepared cifar10 (the builder's examples replaced: no download), read
  from a bucket through storage (staged), equals reading it locally."""
  data_sources.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  examples = {s: [(str(i), {'id': f'{s}_{i}', 'label': int(rng.integers(10)),
                            'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)})
                  for i in range(n)] for s, n in (('train', 12), ('test', 5))}
  monkeypatch.setattr(cifar.Cifar10, '_split_generators',
                      lambda self, dl_manager: {s: iter(e) for s, e in examples.items()})
  local = tmp_path / 'tensorflow_datasets'
  tfds.builder('cifar10', data_dir=str(local)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  bucket = gcs.create_bucket('cifar-tfds')
  for version in (local / 'cifar10').iterdir():
    if version.is_dir() and (version / 'dataset_info.json').exists():
      storage.copy_files(version, f'gs://{bucket}/tfds/cifar10/{version.name}')
  for split in ('train', 'test'):
    want = data_sources.from_tfds('cifar10', split, str(local))
    got = data_sources.from_tfds('cifar10', split, f'gs://{bucket}/tfds')
    assert len(got.labels) == len(examples[split])
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
  with pytest.raises(data_sources.UserError, match='no prepared cifar100 .*download_and_prepare'):
    data_sources.from_tfds('cifar100', 'train', f'gs://{bucket}/tfds')


def test_predict_inputs_from_gs(gcs):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  bucket = gcs.create_bucket('photos')
  pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  for name in ('a.png', 'b.png'):
    epath.Path(f'gs://{bucket}/in/{name}').write_bytes(buffer.getvalue())
  epath.Path(f'gs://{bucket}/in/notes.txt').write_text('not an image')
  paths = serving_images.expand_inputs([f'gs://{bucket}/in/*.png', f'gs://{bucket}/in'])
  assert paths == [f'gs://{bucket}/in/{n}' for n in ('a.png', 'b.png', 'a.png', 'b.png',
                                                     'notes.txt')]
  good, images, warnings = serving_images.read_images(paths)
  assert len(good) == 4 and len(warnings) == 1 and 'notes.txt' in warnings[0]
  np.testing.assert_array_equal(images[0], pixels)


def test_local_paths_are_made_absolute_and_gs_kept():
  assert str(storage.path('gs://b/run')) == 'gs://b/run'
  assert str(storage.path('~/x')) == os.path.expanduser('~/x')
  assert storage.path('rel').is_absolute()
  assert str(storage.path('gs://b/run') / 'c') == 'gs://b/run/c'


def test_a_gs_checkpoint_without_its_commit_file_is_not_resumed_from(gcs):
  """Orbax's GCS protocol decides what is complete: a step directory whose
  commit_success.txt is missing (a save cut short) is not listed, so the restore takes
  the previous step, and nothing is deleted."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cifar_jax import checkpointing  # pylint: disable=import-outside-toplevel
  from cifar_jax.step import TrainState  # pylint: disable=import-outside-toplevel
  workdir = f'gs://{gcs.create_bucket("commits")}/run'
  manager = checkpointing.create_manager(workdir)
  state = TrainState(step=jnp.asarray(0), params={'w': jnp.zeros(4)}, batch_stats={},
                     opt_state={'m': jnp.zeros(4)}, ema_params=None, graphdef=None, tx=None,
                     learning_rate_fn=None)
  for step in (1, 2):
    checkpointing.save(manager, state.replace(step=jnp.asarray(step),
                                              params={'w': jnp.full(4, float(step))}), step)
    manager.wait_until_finished()
  manager.close()
  step_2 = checkpointing.checkpoints_dir(workdir) / '2'
  assert (step_2 / 'commit_success.txt').exists()
  (step_2 / 'commit_success.txt').unlink()
  reader = checkpointing.open_read_only(workdir)
  assert reader.all_steps() == [1]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = checkpointing.restore(reader, state, device)
  assert int(restored.step) == 1 and float(restored.params['w'][0]) == 1.0
  assert (step_2 / 'default').exists()  # Left alone.
