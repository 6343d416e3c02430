"""Device pipeline: batches made inside the compiled step are functions of (seed, step) only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import dispatch, parallel
from cifar_jax.data import device_pipeline
from cifar_jax.data.cifar import MEAN_STD

N = 96  # Examples; 12 steps per epoch at batch 8, 3 at batch 32.


@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def feed():
  # Pixel (r, c) of example i is (i, r + 1, c + 1): a crop, flip or cutout can be read back,
  # and raw 0 in channel 1 means padding.
  images = np.zeros((N, 32, 32, 3), np.uint8)
  images[..., 0] = np.arange(N)[:, None, None]
  images[..., 1] = np.arange(1, 33)[None, :, None]
  images[..., 2] = np.arange(1, 33)[None, None, :]
  return {'images': images, 'labels': (np.arange(N) % 10).astype(np.int32)}


def _config(batch_size=32, cutout=0, seed=0):
  from configs import default
  config = default.get_config()
  config.update(batch_size=batch_size, cutout=cutout, seed=seed)
  return config


def batches(backend, feed, config, steps, local_only=False):
  """The global batches of `steps` as built under `backend` (each device makes its rows);
  with `local_only`, only this process's rows (for multi-process runs)."""
  def fn(data, step, axis_name, constrain=None):
    batch = dispatch.device_batch(data, step, 0, config=config, axis_name=axis_name,
                                  constrain=constrain)
    return batch['image'], batch['label']

  kind = parallel.Kind
  compiled = backend.compile(fn, (kind.DATA, kind.SCALAR), (kind.ROWS, kind.ROWS))
  data = backend.put_data(feed)
  out = []
  for s in steps:
    arrays = compiled(data, backend.put_scalar(s))
    if local_only:  # Rows of this process's devices, in global order.
      arrays = [np.concatenate([np.asarray(shard.data) for shard in sorted(
          a.addressable_shards, key=lambda shard: shard.index[0].start)]) for a in arrays]
    images, labels = jax.device_get(arrays)
    out.append((np.reshape(images, (-1, 32, 32, 3)), np.reshape(labels, (-1,))))
  return out


def raw(images):
  mean, std = (np.asarray(v) * 255 for v in MEAN_STD['cifar10'])
  return np.round(images * std + mean).astype(int)


@pytest.mark.parametrize('n', [1, 2, 3, 70, 256, 50_000])
def test_shuffled_index_is_a_permutation(n):
  order = jax.jit(device_pipeline.shuffled_index, static_argnums=2)(
      jax.random.key(7), jnp.arange(n), n)
  assert sorted(np.asarray(order).tolist()) == list(range(n))


def test_shuffled_index_depends_on_the_key_and_is_not_the_identity():
  f = jax.jit(device_pipeline.shuffled_index, static_argnums=2)
  a, b = (np.asarray(f(jax.random.key(s), jnp.arange(1000), 1000)) for s in (0, 1))
  assert not np.array_equal(a, b)
  assert np.mean(a == np.arange(1000)) < 0.02 and abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.1


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_same_batches_on_1_4_and_8_devices_under_every_backend(feed):
  config = _config(cutout=8)
  steps = [0, 1, 5, 7]  # Two epochs of 3 steps.
  want = batches(parallel.create_backend('jit', jax.devices()[:1]), feed, config, steps)
  for name, count in [('jit', 8), ('shard_map', 4), ('shard_map', 8), ('pmap', 8), ('pmap', 4)]:
    got = batches(parallel.create_backend(name, jax.devices()[:count]), feed, config, steps)
    for (a, la), (b, lb) in zip(want, got):
      np.testing.assert_array_equal(a, b, err_msg=f'{name} x {count}')
      np.testing.assert_array_equal(la, lb, err_msg=f'{name} x {count}')


def test_each_epoch_is_a_permutation_and_labels_follow(feed):
  config = _config(batch_size=8)
  out = batches(parallel.create_backend('jit'), feed, config, range(24))
  index = np.array([raw(img)[:, 12:20, 12:20, 0].max(axis=(1, 2)) for img, _ in out])  # [24, 8]
  epoch0, epoch1 = index[:12].ravel(), index[12:].ravel()
  assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
  assert list(epoch0) != list(epoch1)
  labels = np.concatenate([l for _, l in out[:12]])
  np.testing.assert_array_equal(labels, epoch0 % 10)


def test_augmentation_is_sane_and_depends_on_the_seed(feed):
  config = _config(batch_size=96, cutout=8)
  (images, _), = batches(parallel.create_backend('jit'), feed, config, [0])
  pixels = raw(images)
  holes = np.all(images == 0.0, axis=-1)  # Cutout: exact zeros once normalized.
  flipped, shifts = 0, []
  for img, hole in zip(pixels, holes):
    real = (img[..., 1] > 0) & (img[..., 2] > 0) & ~hole  # Neither padding nor cutout.
    assert real.sum() >= 28 * 28 - 64  # A crop loses at most 4 rows and 4 columns; cutout 64.
    rows, cols = np.nonzero(real)
    src_row, src_col = img[rows, cols, 1] - 1, img[rows, cols, 2] - 1
    dy = np.unique(src_row - rows)
    direction = np.unique(np.sign(np.diff(img[rows[0], :, 2][real[rows[0]]])))
    assert len(dy) == 1 and abs(dy[0]) <= 4
    flip = direction.tolist() == [-1]
    flipped += flip
    dx = np.unique(src_col - (31 - cols if flip else cols))
    assert len(dx) == 1 and abs(dx[0]) <= 4
    shifts.append((dy[0], dx[0]))
  assert 30 <= flipped <= 66  # About half (p = 1/2, 96 images: within 3.7 sigma).
  assert len(set(shifts)) > 20  # Offsets vary.
  # Cutout: an 8x8 square (clipped at the border).
  for hole in holes:
    rows, cols = np.nonzero(hole)
    assert len(rows) and len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= 64
  assert max(h.sum() for h in holes) == 64
  (other, _), = batches(parallel.create_backend('jit'), feed, _config(96, 8, seed=1), [0])
  assert not np.array_equal(images, other)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_device_eval_counts_every_example_like_the_host_eval():
  from cifar_jax import create_train_state, train
  from cifar_jax.data.sources import synthetic
  config = _config()
  config.update(model='fast_cnn', eval_batch_size=50)  # Rounded up to 56 on 8 devices.
  data = synthetic('cifar10', 'test')
  data = type(data)(data.images[:203], data.labels[:203])  # 203 = 3 * 56 + 35.
  state = create_train_state(config, jax.random.key(0), 256)
  jit = parallel.create_backend('jit')
  host = train.evaluate(jit, jit.put_state(state), data, config)
  for name in parallel.BACKENDS:
    backend = parallel.create_backend(name)
    got = train.evaluate(backend, backend.put_state(state), data, config,
                         backend.put_data({'images': data.images, 'labels': data.labels}))
    assert got['eval_count'] == 203
    assert got['eval_accuracy'] == pytest.approx(host['eval_accuracy'], abs=1e-9), name
    assert got['eval_loss'] == pytest.approx(host['eval_loss'], rel=1e-4), name


def test_data_that_would_not_fit_names_the_host_pipeline(monkeypatch):
  assert device_pipeline.check_fits(200 << 20, None) is None  # CPU: no statistics.
  assert device_pipeline.check_fits(200 << 20, {'bytes_limit': 16 << 30}) is None
  problem = device_pipeline.check_fits(200 << 20, {'bytes_limit': 256 << 20})
  assert '200 MiB' in problem and '256 MiB' in problem
  # The loop turns it into one error line before copying anything.
  from cifar_jax import train
  from cifar_jax.data.sources import synthetic
  from cifar_jax.errors import UserError

  class SmallDevice:
    def memory_stats(self):
      return {'bytes_limit': 64 << 20}

  monkeypatch.setattr(train.jax, 'local_devices', lambda: [SmallDevice()])
  splits = synthetic('cifar10', 'train', num_examples=20_000), synthetic('cifar10', 'test')
  with pytest.raises(UserError, match=r'needs 88 MiB .* 64 MiB; use --config.input_pipeline=host'):
    train._put_on_devices(parallel.create_backend('jit'), *splits)  # pylint: disable=protected-access


def _views(images):
  """Per image of a batch: (example index, flipped?, source rows, source cols)."""
  out = []
  for img in raw(images):
    rows, cols = img[:, 16, 1] - 1, img[16, :, 2] - 1  # Row/col each output pixel came from.
    out.append((int(img[12:20, 12:20, 0].max()), bool(cols[10] > cols[20]), rows, cols))
  return out


def _reflect(i):
  return np.where(i < 0, -i, np.where(i > 31, 62 - i, i))


def test_alternating_flip_mirrors_each_image_in_alternate_epochs(feed):
  config = _config(batch_size=32)
  config.update(flip='alternating', crop_padding=2, crop_pad_mode='reflect')
  out = batches(parallel.create_backend('jit'), feed, config, range(9))  # 3 epochs of 3 steps.
  flipped = {}
  for step, (images, _) in enumerate(out):
    for index, flip, _, _ in _views(images):
      flipped.setdefault(index, [None] * 3)[step // 3] = flip
  assert sorted(flipped) == list(range(N))
  first = np.array([flipped[i][0] for i in range(N)])
  assert 30 <= first.sum() <= 66  # Epoch 0 at random (p = 1/2).
  for i in range(N):  # Then the opposite view in epoch 1 and the first one again in epoch 2.
    assert flipped[i] == [first[i], not first[i], first[i]], i
  # The pattern is a function of (seed, example index): the same for another batch size.
  config.batch_size = 16
  (images, _), = batches(parallel.create_backend('jit'), feed, config, [0])
  for index, flip, _, _ in _views(images):
    assert flip == first[index]


def test_reflection_padded_translation_by_up_to_2_pixels(feed):
  config = _config(batch_size=96)
  config.update(crop_padding=2, crop_pad_mode='reflect', flip='none')
  (images, _), = batches(parallel.create_backend('jit'), feed, config, [0])
  grid, shifts = np.arange(32), set()
  for _, flip, rows, cols in _views(images):
    assert not flip
    dy, dx = rows[16] - 16, cols[16] - 16
    assert abs(dy) <= 2 and abs(dx) <= 2
    # Every pixel is an image pixel (no zero padding): the border is mirrored, not repeated.
    np.testing.assert_array_equal(rows, _reflect(grid + dy))
    np.testing.assert_array_equal(cols, _reflect(grid + dx))
    shifts.add((dy, dx))
  assert len(shifts) == 25  # All 5 x 5 offsets occur among 96 images.


def test_default_fields_keep_the_batches_of_earlier_versions():
  # Checksums of batches made by commit 5c74c3d (before the crop/flip fields existed) from
  # the same pixels: the new fields at their defaults must not change a single pixel.
  images = (np.arange(N * 32 * 32 * 3) * 2654435761 % 251).astype(np.uint8).reshape(N, 32, 32, 3)
  labels = (np.arange(N) % 10).astype(np.int32)
  got = []
  for cutout in (0, 8):
    for s in (0, 5):
      batch = jax.jit(lambda s, c=cutout: device_pipeline.train_batch(
          jnp.asarray(images), jnp.asarray(labels), s, jnp.arange(32), seed=3, batch_size=32,
          dataset='cifar10', cutout=c))(s)
      px = raw(np.asarray(batch['image'])).astype(np.int64)
      got.append(int((px * (np.arange(px.size).reshape(px.shape) % 9973 + 1)).sum() % (2**61 - 1)))
  assert got == [51652381472, 52048564378, 51930200005, 52221733015]
