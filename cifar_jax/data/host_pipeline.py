"""Host input pipeline (tf.data): shuffled, augmented, normalized global batches.

Batch `s` of a run is a pure function of (seed, s): the epoch's permutation
comes from (seed, epoch) and every random crop/flip/cutout from (seed, s,
example index), through TensorFlow's stateless random ops. So a resumed run
sees exactly the batches it would have seen, whatever the device or process
count. Each process materializes only its slice of the global batch.

TensorFlow is imported lazily and never sees GPUs/TPUs; the eval batches are
plain numpy and need no TensorFlow at all.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from cifar_jax.data.cifar import IMAGE_SIZE, MEAN_STD, Split, normalize, steps_per_epoch
from cifar_jax.data.sources import import_tensorflow

_SHUFFLE, _CROP, _FLIP, _CUTOUT = range(4)  # Independent stateless streams.


def train_batches(data: Split, config, start_step: int, end_step: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Yields this process's slice of global batches start_step .. end_step-1.

  Each epoch is a fresh permutation (the last partial batch of an epoch is
  dropped); images get a random crop of the image padded by `config.crop_padding`
  pixels (`crop_pad_mode`: zeros or reflection), a horizontal flip (`config.flip`:
  random, alternating as in `device_pipeline.flips`, or none) and, if
  `config.cutout` > 0, a cutout square, then normalization.
  Yields {'image': float32 [b, 32, 32, 3], 'label': int32 [b]}.
  """
  tf = import_tensorflow()
  n, batch = len(data.labels), config.batch_size
  if batch % process_count:
    raise ValueError(f'batch_size {batch} is not divisible by {process_count} processes')
  epoch_steps = steps_per_epoch(n, batch)
  local = batch // process_count
  lo = process_index * local
  seed = int(config.seed)
  mean, std = (tf.constant(v, tf.float32) * 255.0 for v in MEAN_STD[config.dataset])
  images = tf.constant(data.images)
  labels = tf.constant(data.labels.astype(np.int32))
  cutout = int(config.cutout)
  pad = int(config.crop_padding)
  pad_mode = {'zeros': 'CONSTANT', 'reflect': 'REFLECT'}[config.crop_pad_mode]
  flip_mode = config.flip

  def stream(kind, counter):
    return tf.stack([tf.constant(seed, tf.int64) * 4 + kind, tf.cast(counter, tf.int64)])

  # Counter -1 never collides with a step's stream.
  first_flip = tf.random.stateless_uniform([n], stream(_FLIP, -1)) < 0.5

  def make_batch(step):
    epoch, k = step // epoch_steps, step % epoch_steps
    perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed=stream(_SHUFFLE, epoch))
    idx = perm[k * batch + lo:k * batch + lo + local]
    x = tf.gather(images, idx)
    # Random crop: the randoms are drawn for the whole global batch, then sliced,
    # so example i of step s gets the same crop on any number of processes.
    offsets = tf.random.stateless_uniform([batch, 2], stream(_CROP, step), 0, 2 * pad + 1,
                                          dtype=tf.int32)[lo:lo + local]
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=pad_mode)
    grid = tf.range(IMAGE_SIZE)[None, :]
    x = tf.gather(x, offsets[:, :1] + grid, axis=1, batch_dims=1)
    x = tf.gather(x, offsets[:, 1:] + grid, axis=2, batch_dims=1)
    if flip_mode == 'random':
      flip = tf.random.stateless_uniform([batch], stream(_FLIP, step))[lo:lo + local] < 0.5
    elif flip_mode == 'alternating':  # Epoch 0 at random by example, then alternating.
      flip = tf.math.logical_xor(tf.gather(first_flip, idx), epoch % 2 == 1)
    else:
      flip = tf.zeros([local], tf.bool)
    x = tf.where(flip[:, None, None, None], tf.reverse(x, [2]), x)
    x = (tf.cast(x, tf.float32) - mean) / std
    if cutout:
      centers = tf.random.stateless_uniform([batch, 2], stream(_CUTOUT, step), 0, IMAGE_SIZE,
                                            dtype=tf.int32)[lo:lo + local]
      # A cutout x cutout square around the centre, clipped at the border (an even size
      # used to give a square one pixel smaller).
      first = centers - cutout // 2
      rows = (grid >= first[:, :1]) & (grid < first[:, :1] + cutout)  # [b, 32]
      cols = (grid >= first[:, 1:]) & (grid < first[:, 1:] + cutout)
      hole = tf.logical_and(rows[:, :, None], cols[:, None, :])[..., None]
      x = tf.where(hole, 0.0, x)
    return {'image': x, 'label': tf.gather(labels, idx)}

  ds = tf.data.Dataset.range(start_step, end_step)
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(2)
  return ds.as_numpy_iterator()


def eval_batches(data: Split, dataset: str, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """The whole split exactly once, in order; the last batch is zero-padded.

  Yields this process's slice of each global batch with a `mask` (1 = real
  example), so sums over masked outputs count every example exactly once.
  """
  n = len(data.labels)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = min(start + process_index * local, n)
    hi = min(lo + local, n)
    real = hi - lo
    images = np.zeros((local, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    labels = np.zeros((local,), np.int32)
    images[:real] = normalize(data.images[lo:hi], dataset)
    labels[:real] = data.labels[lo:hi]
    yield {'image': images, 'label': labels, 'mask': (np.arange(local) < real).astype(np.float32)}
