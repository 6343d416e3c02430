"""Many train steps per compiled call, and a whole eval in one.

Python's dispatch of a compiled call costs tens of microseconds to milliseconds;
a small CIFAR step on an accelerator takes a few. `train_steps` runs steps
`first .. last-1` of a dispatch in one `lax.fori_loop` and keeps the metric sums
and the first non-finite step on the device, so the host only looks at them
when it logs. The bounds are *traced* arguments: one executable serves every
dispatch length, so 1 and 16 steps per call run the very same compiled loop body
and give bit-identical results, and a dispatch can stop exactly at any log, eval
or checkpoint boundary without a recompile.

On XLA:CPU a convolution's weight gradient runs ~50x slower inside a loop body
than outside (measured: 2.4 s vs 45 ms for a 3x3 64->64 conv at batch 16;
jax-ml/jax#12868), so there `loop=False` compiles the loop body alone and the
backend calls it once per step: same metrics on the device, same boundaries.

Where the batches come from is a `make_batch(feed, step, i)` function:
`host_batch` indexes a block of host-made batches [k, B, ...]; `device_batch`
builds batch `step` from the device-resident dataset (`device_pipeline`).

A population (`members` > 1, `population`) runs the same loop over a state with a
leading member axis: the step is vmapped, each batch is [N, B, ...] (member i's is the
solo run's with seed + i), and the carry's sums and first bad step are [N].

Pure functions, no TensorFlow; `parallel.Backend` compiles them for pmap,
shard_map or jit.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import population, step as step_lib
from cifar_jax.data import device_pipeline
from cifar_jax.data.cifar import NUM_CLASSES

TRAIN_METRICS = ('train_loss', 'train_accuracy', 'learning_rate', 'grad_norm')
EVAL_SUMS = ('loss_sum', 'correct', 'correct_top5', 'count', 'confusion')


def new_carry(members: int = 1) -> dict:
  """What the loop keeps on the device between logs: metric sums and the first bad step
  (one per member of a population)."""
  if members == 1:
    return {'sums': {k: np.float32(0.0) for k in TRAIN_METRICS}, 'first_bad': np.int32(-1)}
  return {'sums': {k: np.zeros(members, np.float32) for k in TRAIN_METRICS},
          'first_bad': np.full(members, -1, np.int32)}


def train_steps(state: step_lib.TrainState, carry: dict, feed, first: jax.Array, last: jax.Array,
                *, make_batch: Callable, axis_name: str | None = None, sync_grads: bool = False,
                loop: bool = True, members: int = 1):
  """Runs the steps `first .. last-1` of a dispatch; returns the new state and carry.

  Args:
    carry: `new_carry()`-shaped: metrics are added to `sums`; `first_bad` becomes
      the (1-based) step whose loss or gradient norm was first NaN/Inf.
    feed: what `make_batch(feed, step, i)` reads the i-th step's batch from.
    first, last: traced int32 bounds of the step index i within the dispatch.
    loop: False runs step `first` alone, with no loop around it (`last` unused).
    members: > 1 for a population (`state`, the batches and the carry have a member axis).
  """
  step_fn = population.train_step if members > 1 else step_lib.train_step
  step_fn = functools.partial(step_fn, axis_name=axis_name, sync_grads=sync_grads)

  def body(i, state_and_carry):
    state, carry = state_and_carry
    batch = make_batch(feed, state.step if members == 1 else state.step[0], i)
    new_state, metrics = step_fn(state, batch)
    bad = ~(jnp.isfinite(metrics['train_loss']) & jnp.isfinite(metrics['grad_norm']))
    first_bad = jnp.where((carry['first_bad'] < 0) & bad, state.step + 1, carry['first_bad'])
    sums = {k: carry['sums'][k] + metrics[k].astype(jnp.float32) for k in TRAIN_METRICS}
    return new_state, {'sums': sums, 'first_bad': first_bad.astype(jnp.int32)}

  if not loop:
    return body(first, (state, carry))
  return jax.lax.fori_loop(first, last, body, (state, carry))


def host_batch(feed: dict, step: jax.Array, i: jax.Array) -> dict:  # pylint: disable=unused-argument
  """The i-th batch of a block of host-made batches {'image': [k, b, ...], 'label': [k, b]}."""
  return {k: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in feed.items()}


def host_member_batch(feed: dict, step: jax.Array, i: jax.Array, constrain=None) -> dict:
  """The i-th batches of a population's block [k, b, N, ...] (the member axis after the
  rows, so that every backend splits the rows as a solo block's): [N, b, ...]."""
  batch = {k: jnp.swapaxes(v, 0, 1) for k, v in host_batch(feed, step, i).items()}
  return constrain(batch, members=True) if constrain is not None else batch


def local_positions(global_size: int, axis_name: str | None, constrain=None) -> jax.Array:
  """Positions in the global batch this program makes: all of them under jit (where
  `constrain` shards them over the devices), a device's own rows under pmap/shard_map."""
  if axis_name is None:
    positions = jnp.arange(global_size, dtype=jnp.int32)
    return constrain(positions) if constrain is not None else positions
  local = global_size // jax.lax.axis_size(axis_name)
  return jax.lax.axis_index(axis_name) * local + jnp.arange(local, dtype=jnp.int32)


def device_batch(feed: dict, step: jax.Array, i: jax.Array, *, config,  # pylint: disable=unused-argument
                 axis_name: str | None = None, constrain=None) -> dict:
  """Train batch `step` made on the device from feed = {'images': uint8 [N, ...], 'labels'}."""
  positions = local_positions(config.batch_size, axis_name, constrain)
  batch = device_pipeline.train_batch(
      feed['images'], feed['labels'], step, positions, seed=int(config.seed),
      batch_size=int(config.batch_size), dataset=config.dataset, cutout=int(config.cutout),
      pad=int(config.crop_padding), pad_mode=config.crop_pad_mode, flip=config.flip)
  return constrain(batch) if constrain is not None else batch


def device_member_batch(feed: dict, step: jax.Array, i: jax.Array, *, config, members: int,  # pylint: disable=unused-argument
                        axis_name: str | None = None, constrain=None,
                        member_axis: str | None = None) -> dict:
  """A population's train batches [N, b, ...]: member j's is `device_batch` of the solo
  run with seed `config.seed + j`, bit for bit. With `member_axis` (the members split
  over the devices) this device's members' whole batches."""
  first = 0
  if member_axis is not None:
    members //= jax.lax.axis_size(member_axis)
    first = jax.lax.axis_index(member_axis) * members
  batch = population.device_batches(feed['images'], feed['labels'], step, config, members,
                                    local_positions(config.batch_size, axis_name), first)
  return constrain(batch, members=True) if constrain is not None else batch


def eval_all(state: step_lib.TrainState, feed: dict, *, batch_size: int, dataset: str,
             axis_name: str | None = None, constrain=None, tta: int = 0,
             members: int = 1, member_axis: str | None = None) -> dict:
  """Sums of `step.eval_step` over every example of the device-resident test split
  (`population.eval_step`'s, per member and for the ensemble, with `members` > 1).

  Global batches of `batch_size` (a multiple of the device count) in order; the
  last one is padded and its padding masked, so `count` is exactly N.
  """
  n = feed['images'].shape[0]
  positions = local_positions(batch_size, axis_name, constrain)

  def body(j, totals):
    batch = device_pipeline.eval_batch(feed['images'], feed['labels'], j * batch_size + positions,
                                       dataset)
    if constrain is not None:
      batch = constrain(batch)
    if members > 1:
      return jax.tree.map(jnp.add, totals,
                          population.eval_step(state, batch, tta, axis_name, member_axis))
    sums = step_lib.eval_step(state, batch, axis_name, tta)
    return {k: totals[k] + sums[k] for k in EVAL_SUMS}

  classes = NUM_CLASSES[dataset]
  zeros = {k: jnp.zeros((classes, classes) if k == 'confusion' else (), jnp.float32)
           for k in EVAL_SUMS}
  if members > 1:
    # From the first batch's sums, not zeros: with the members split over devices (shard_map)
    # the per-member sums vary by device, which a loop carry must already do on entry.
    first = body(0, population.zero_sums(population.size(state), classes))
    return jax.lax.fori_loop(1, -(-n // batch_size), body, first)
  return jax.lax.fori_loop(0, -(-n // batch_size), body, zeros)


def make_batch_fn(pipeline: str, config, axis_name: str | None, constrain=None,
                  members: int = 1, member_axis: str | None = None) -> Callable:
  if members > 1 and pipeline == 'host':
    return functools.partial(host_member_batch, constrain=constrain)
  if members > 1:
    return functools.partial(device_member_batch, config=config, members=members,
                             axis_name=axis_name, constrain=constrain, member_axis=member_axis)
  if pipeline == 'host':
    return host_batch
  return functools.partial(device_batch, config=config, axis_name=axis_name, constrain=constrain)


def schedule(start_step: int, total_steps: int, steps_per_dispatch: int,
             intervals: tuple[int, ...], boundaries: tuple[int, ...] = ()) -> list[int]:
  """Dispatch lengths from `start_step` to `total_steps`: at most `steps_per_dispatch`,
  never crossing a multiple of any of `intervals` (log, eval, checkpoint) or any of the
  steps `boundaries` (a profiler window), and 1 for the first dispatch, whose time
  (compile included) is reported as `compile_seconds`."""
  sizes, step = [], start_step
  while step < total_steps:
    limit = 1 if not sizes else steps_per_dispatch
    next_boundary = min([total_steps] + [(step // i + 1) * i for i in intervals] +
                        [b for b in boundaries if b > step])
    sizes.append(min(limit, next_boundary - step))
    step += sizes[-1]
  return sizes
