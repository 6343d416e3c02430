"""Device input pipeline: the dataset lives on the devices; batches are made inside the step.

The uint8 train and test splits are put on every device once (CIFAR-10's train
split is 150 MiB). Each train step then picks its examples and applies crop,
flip and cutout in the compiled step itself, so no host work, no host-to-device
copy and no TensorFlow stand between two steps: what airbench does on a GPU.

Batch `s` is a pure function of (seed, s), never of device count, process
count or backend, so resumes and topology changes are exact:

- The epoch's order is a pseudo-random *permutation* of the examples keyed by
  (seed, epoch), evaluated only at the positions a step needs: a Feistel
  network over the next power of four with cycle walking (the same idea as
  `tf.random.experimental.index_shuffle`). No 50,000-element sort per step, and
  a device computes only its own rows.
- Crop offsets, flips and cutout centres come from `jax.random` keys folded
  from (seed, step, position of the example in the global batch).

Same semantics as the host pipeline (random crop of the image padded by
`config.crop_padding` pixels of zeros or reflection, random or alternating
flips, optional cutout to 0 after normalization, last partial batch of an epoch
dropped), with JAX's random numbers instead of TensorFlow's: the two pipelines
give different (equally distributed) batches.

Everything here is pure JAX over arrays and needs no TensorFlow.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.data.cifar import IMAGE_SIZE, PAD, normalize, steps_per_epoch

FEISTEL_ROUNDS = 6         # Luby-Rackoff: 4 rounds of random functions already give a PRP.
MEMORY_FRACTION = 0.5      # The data may take at most this share of a device's memory.
_SHUFFLE, _AUGMENT, _FLIP_BASE = 0, 1, 2  # Independent streams of the seed.


# --- the permutation ---------------------------------------------------------------
def _half_bits(n: int) -> int:
  """Bits of each Feistel half: the domain 4**h is the smallest power of four >= n."""
  return max(1, math.ceil(math.log2(max(n, 2)) / 2))


def shuffled_index(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
  """perm[positions] for the permutation of range(n) that `key` selects.

  A balanced Feistel network whose round functions are random tables (drawn
  from `key`) is a bijection of [0, 4**h); applying it again until the value
  falls below `n` (cycle walking) restricts it to a bijection of [0, n). The
  expected number of walks is 4**h / n < 4. Cost: O(len(positions)).
  """
  h = _half_bits(n)
  mask = jnp.uint32((1 << h) - 1)
  tables = jax.random.randint(key, (FEISTEL_ROUNDS, 1 << h), 0, 1 << h).astype(jnp.uint32)

  def permute(x):
    left, right = x >> h, x & mask
    for r in range(FEISTEL_ROUNDS):
      left, right = right, left ^ tables[r][right]
    return (left << h) | right

  n32 = jnp.uint32(n)
  y = permute(positions.astype(jnp.uint32))
  y = jax.lax.while_loop(lambda y: jnp.any(y >= n32),
                         lambda y: jnp.where(y >= n32, permute(y), y), y)
  return y.astype(jnp.int32)


# --- train batches -------------------------------------------------------------------
def _source_pixel(i: jax.Array, pad_mode: str) -> tuple[jax.Array, jax.Array]:
  """Where pixel `i` of a padded axis (-pad .. 31+pad) comes from, and whether it is an
  image pixel (False: a zero of `zeros` padding)."""
  last = IMAGE_SIZE - 1
  if pad_mode == 'reflect':  # As numpy/PyTorch 'reflect': the edge pixel is not repeated.
    return jnp.where(i < 0, -i, jnp.where(i > last, 2 * last - i, i)), jnp.ones(i.shape, bool)
  return jnp.clip(i, 0, last), (i >= 0) & (i < IMAGE_SIZE)


def flips(mode: str, random: jax.Array, seed: int, index: jax.Array,
          epoch: jax.Array) -> jax.Array:
  """Which examples of the batch are mirrored (bool [b]).

  `random`: the given coin flips, drawn from (seed, step, position).
  `alternating` (airbench): in epoch 0 at random, drawn from (seed, example
  index); from then on every example is mirrored in alternate epochs, the
  opposite of the epoch before, so two consecutive epochs show both views.
  `none`: never.
  """
  if mode == 'none':
    return jnp.zeros(random.shape, bool)
  if mode == 'alternating':
    base_key = jax.random.fold_in(jax.random.key(seed), _FLIP_BASE)
    first = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(base_key, i)))(index)
    return first ^ (epoch % 2 == 1)
  return random


def train_batch(images: jax.Array, labels: jax.Array, step: jax.Array, positions: jax.Array, *,
                seed: int, batch_size: int, dataset: str, cutout: int = 0, pad: int = PAD,
                pad_mode: str = 'zeros', flip: str = 'random') -> dict:
  """The rows `positions` (of the global batch) of train batch `step`.

  Args:
    images, labels: the whole train split on this device, uint8 [N,32,32,3], int32 [N].
    step: the 0-based step (int32 scalar, traced); epochs are N // batch_size steps.
    positions: int32 [b], positions in the global batch this call makes (all of
      them under jit, a device's rows under pmap/shard_map).
    pad, pad_mode: random crop of the image padded by `pad` pixels of `zeros` or
      `reflect` (a translation by up to `pad` pixels; 0 = no crop).
    flip: `random` | `alternating` | `none` (`flips`).
  Returns {'image': float32 [b,32,32,3] normalized, 'label': int32 [b]}.
  """
  n = images.shape[0]
  epoch_steps = steps_per_epoch(n, batch_size)
  seed_key = jax.random.key(seed)
  epoch, k = step // epoch_steps, step % epoch_steps
  order_key = jax.random.fold_in(jax.random.fold_in(seed_key, _SHUFFLE), epoch)
  index = shuffled_index(order_key, k * batch_size + positions, n)

  step_key = jax.random.fold_in(jax.random.fold_in(seed_key, _AUGMENT), step)
  keys = jax.vmap(lambda p: jax.random.split(jax.random.fold_in(step_key, p), 3))(positions)
  offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * pad + 1))(keys[:, 0])
  flip = flips(flip, jax.vmap(jax.random.bernoulli)(keys[:, 1]), seed, index, epoch)
  grid = jnp.arange(IMAGE_SIZE)
  # Crop, then flip: output pixel (i, j) is padded pixel (dy + i, dx + j'), j' = 31 - j if
  # flipped. One gather does the example lookup, crop and flip.
  rows, rows_in = _source_pixel(offsets[:, :1] - pad + grid, pad_mode)            # [b, 32]
  cols, cols_in = _source_pixel(offsets[:, 1:] - pad + jnp.where(flip[:, None], IMAGE_SIZE - 1 - grid, grid),
                                pad_mode)
  pixels = images[index[:, None, None], rows[:, :, None], cols[:, None, :]]      # [b, 32, 32, 3]
  if pad_mode == 'zeros':
    pixels = jnp.where((rows_in[:, :, None] & cols_in[:, None, :])[..., None], pixels, 0)
  x = normalize(pixels, dataset)
  if cutout:
    centres = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, IMAGE_SIZE))(keys[:, 2])
    # A cutout x cutout square around the centre (clipped at the border).
    rows_in = (grid >= centres[:, :1] - cutout // 2) & (grid < centres[:, :1] - cutout // 2 + cutout)
    cols_in = (grid >= centres[:, 1:] - cutout // 2) & (grid < centres[:, 1:] - cutout // 2 + cutout)
    hole = rows_in[:, :, None] & cols_in[:, None, :]
    x = jnp.where(hole[..., None], 0.0, x)
  return {'image': x, 'label': labels[index]}


def eval_batch(images: jax.Array, labels: jax.Array, positions: jax.Array, dataset: str) -> dict:
  """Test examples `positions` (past the end: padding, mask 0), normalized, in order."""
  n = images.shape[0]
  index = jnp.minimum(positions, n - 1)
  return {'image': normalize(images[index], dataset), 'label': labels[index],
          'mask': (positions < n).astype(jnp.float32)}


# --- memory --------------------------------------------------------------------------
def check_fits(data_bytes: int, memory_stats: dict | None) -> str | None:
  """None if `data_bytes` fits the device; else the reason. No statistics (CPU): fits."""
  if not memory_stats or 'bytes_limit' not in memory_stats:
    return None
  limit = int(memory_stats['bytes_limit'])
  if data_bytes > MEMORY_FRACTION * limit:
    return (f'the dataset needs {data_bytes / 2**20:.0f} MiB on every device, more than '
            f'{MEMORY_FRACTION:.0%} of its {limit / 2**20:.0f} MiB')
  return None


def nbytes(*arrays: np.ndarray) -> int:
  return sum(int(a.nbytes) for a in arrays)
