"""Data-parallel backends: the same pure step under pmap, shard_map or jit.

A `Backend` owns the device mesh, places train states, batches and the
device-resident dataset on it and compiles `step.train_step` /
`step.eval_step` and the many-steps-per-call `dispatch` functions for it. All
three give the same numbers: BatchNorm statistics, loss and metrics are
global-batch values.
"""
from __future__ import annotations

import collections
import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cifar_jax import dispatch, step as step_lib

BACKENDS = ('pmap', 'shard_map', 'jit')
AXIS = 'data'


class Backend:
  """Places state and batches on all devices and runs the compiled steps.

  Under `pmap` the state carries a leading device axis; under `shard_map` and
  `jit` it is one replicated global array per leaf and batches are sharded
  along the `('data',)` mesh axis.
  """

  def __init__(self, parallelism: str, devices=None, loop_dispatch: bool | None = None):
    """`loop_dispatch`: run a dispatch's steps in one compiled loop (default: except on
    CPU, where XLA runs weight-gradient convolutions ~50x slower in loops; see dispatch.py)."""
    if parallelism not in BACKENDS:
      raise ValueError(f'unknown parallelism {parallelism!r}; choose one of {BACKENDS}')
    self.name = parallelism
    # Grouped by process: process p's devices hold rows [p*B/P, (p+1)*B/P) of each global
    # batch, the slice input_pipeline gives process p.
    self.devices = sorted(devices if devices is not None else jax.devices(),
                          key=lambda d: d.process_index)
    self.num_devices = len(self.devices)
    self.loop_dispatch = (self.devices[0].platform != 'cpu' if loop_dispatch is None
                          else loop_dispatch)
    self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    self._dispatch_cache = {}  # Compiled dispatch functions, by kind and config.
    self._scalars = {}  # Dispatch scalar arguments on the devices, by value.
    if parallelism == 'pmap':
      self._train = jax.pmap(functools.partial(step_lib.train_step, axis_name=AXIS, sync_grads=True),
                             axis_name=AXIS, devices=self.devices, donate_argnums=(0,))
      self._eval = lambda tta: jax.pmap(functools.partial(step_lib.eval_step, axis_name=AXIS,
                                                          tta=tta),
                                        axis_name=AXIS, devices=self.devices)
    elif parallelism == 'shard_map':
      smap = lambda f, out: jax.shard_map(f, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                          out_specs=out, check_vma=True)
      self._train = jax.jit(smap(functools.partial(step_lib.train_step, axis_name=AXIS),
                                 (P(), P())), donate_argnums=(0,))
      self._eval = lambda tta: jax.jit(smap(functools.partial(step_lib.eval_step, axis_name=AXIS,
                                                              tta=tta), P()))
    else:
      self._train = jax.jit(step_lib.train_step, in_shardings=(self.replicated, self.sharded),
                            out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
      self._eval = lambda tta: jax.jit(functools.partial(step_lib.eval_step, tta=tta),
                                       in_shardings=(self.replicated, self.sharded),
                                       out_shardings=self.replicated)

  # --- placement ---------------------------------------------------------------
  def put_state(self, state: step_lib.TrainState) -> step_lib.TrainState:
    if self.name == 'pmap':
      return jax.tree.map(
          lambda x: jax.device_put(jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x)),
                                   self.sharded), state)
    return jax.device_put(state, self.replicated)

  def get_state(self, state: step_lib.TrainState) -> step_lib.TrainState:
    """The state as global (unreplicated) arrays, e.g. for checkpoints."""
    if self.name == 'pmap':
      return jax.tree.map(lambda x: x[0], state)
    return state

  def put_batch(self, batch: dict) -> dict:
    """Host numpy batch (global batch on one process) -> device arrays, async."""
    if self.name == 'pmap':
      return {k: jax.device_put(v.reshape((self.num_devices, -1) + v.shape[1:]), self.sharded)
              for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

  def prefetch(self, batches: Iterable[dict], size: int = 2, put=None) -> Iterator[dict]:
    """Keeps `size` batches in flight to the devices so steps never wait on a copy.

    `put` places one host batch (default `put_batch`; `put_batches` for blocks).
    """
    put = put or self.put_batch
    queue = collections.deque()
    iterator = iter(batches)
    for batch in iterator:
      queue.append(put(batch))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  # --- steps -------------------------------------------------------------------
  def train_step(self, state, batch):
    return self._train(state, batch)

  def eval_step(self, state, batch, tta: int = 0):
    """`step.eval_step` with test-time augmentation level `tta` (compiled once per level)."""
    key = ('eval_step', tta)
    if key not in self._dispatch_cache:
      self._dispatch_cache[key] = self._eval(tta)
    return self._dispatch_cache[key](state, batch)

  # --- many steps per call (dispatch.py) ----------------------------------------
  def compile(self, fn, kinds, out_kinds, donate=()):
    """`fn(*args, axis_name=..)` (per device, or global under jit) jitted for this backend.

    `kinds` names each argument's layout: 'state' (replicated; leading device axis
    under pmap), 'rows' ([B, ...] split along B), 'batches' ([k, B, ...] split
    along B), 'data' (whole on every device) or 'scalar' (a replicated scalar;
    broadcast under pmap); `out_kinds` each output's. Under jit `fn` also gets
    `constrain`, which shards a [B, ...] tree along B.
    """
    if self.name == 'pmap':
      axes = {'state': 0, 'rows': 0, 'batches': 0, 'data': 0, 'scalar': None}
      return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS,
                      devices=self.devices, in_axes=tuple(axes[k] for k in kinds),
                      donate_argnums=donate)
    specs = {'state': P(), 'rows': P(AXIS), 'batches': P(None, AXIS), 'data': P(), 'scalar': P()}
    if self.name == 'shard_map':
      mapped = jax.shard_map(functools.partial(fn, axis_name=AXIS), mesh=self.mesh,
                             in_specs=tuple(specs[k] for k in kinds),
                             out_specs=tuple(specs[k] for k in out_kinds), check_vma=True)
      return jax.jit(mapped, donate_argnums=donate)
    shardings = lambda ks: tuple(NamedSharding(self.mesh, specs[k]) for k in ks)
    constrain = lambda tree: jax.lax.with_sharding_constraint(tree, self.sharded)
    return jax.jit(functools.partial(fn, axis_name=None, constrain=constrain),
                   in_shardings=shardings(kinds), out_shardings=shardings(out_kinds),
                   donate_argnums=donate)

  def train_dispatch(self, pipeline: str, config):
    """`run(state, carry, feed, num_steps, poison_step) -> (state, carry)`: one dispatch.

    `feed` is a block of host batches (`put_batches`) or the device-resident
    train split (`put_data`); see `dispatch.train_steps`. With `loop_dispatch`
    it is one compiled call, else one call of the compiled step per step.
    """
    key = ('train', pipeline, id(config))
    if key not in self._dispatch_cache:
      sync, loop = self.name == 'pmap', self.loop_dispatch

      def fn(state, carry, feed, first, last, poison_step, axis_name, constrain=None):
        make_batch = dispatch.make_batch_fn(pipeline, config, axis_name, constrain)
        return dispatch.train_steps(state, carry, feed, first, last, poison_step,
                                    make_batch=make_batch, axis_name=axis_name, sync_grads=sync,
                                    loop=loop)

      feed_kind = 'batches' if pipeline == 'host' else 'data'
      compiled = self.compile(fn, ('state', 'state', feed_kind, 'scalar', 'scalar', 'scalar'),
                              ('state', 'state'), donate=(0, 1))

      def run(state, carry, feed, num_steps, poison_step):
        if loop:
          return compiled(state, carry, feed, self.put_scalar(0), self.put_scalar(num_steps),
                          poison_step)
        for i in range(num_steps):
          state, carry = compiled(state, carry, feed, self.put_scalar(i), self.put_scalar(i + 1),
                                  poison_step)
        return state, carry

      self._dispatch_cache[key] = run
    return self._dispatch_cache[key]

  def eval_dispatch(self, config, tta: int = 0):
    """Compiled `(state, test_data) -> sums` over the whole device-resident test split,
    with test-time augmentation level `tta`."""
    key = ('eval', id(config), tta)
    if key not in self._dispatch_cache:
      batch_size = self.eval_batch_size(config.eval_batch_size)

      def fn(state, feed, axis_name, constrain=None):
        return (dispatch.eval_all(state, feed, batch_size=batch_size, dataset=config.dataset,
                                  axis_name=axis_name, constrain=constrain, tta=tta),)

      compiled = self.compile(fn, ('state', 'data'), ('state',))
      self._dispatch_cache[key] = lambda state, feed: compiled(state, feed)[0]
    return self._dispatch_cache[key]

  def eval_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (the padding is masked)."""
    return -(-requested // self.num_devices) * self.num_devices

  def put_data(self, arrays: dict) -> dict:
    """Host numpy arrays -> one whole copy on every device (each process fills only its own
    devices; every process must pass the same arrays)."""
    def put(x):
      x = np.asarray(x)
      if self.name == 'pmap':
        return jax.make_array_from_callback((self.num_devices,) + x.shape, self.sharded,
                                            lambda index: x[None])
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x)
    return {k: put(v) for k, v in arrays.items()}

  def put_batches(self, block: dict) -> dict:
    """This process's slices of k global batches {'image': [k, b, ...], ...} -> device arrays."""
    if self.name == 'pmap':
      return {k: jax.device_put(
          np.swapaxes(v.reshape((v.shape[0], self.num_devices, -1) + v.shape[2:]), 0, 1),
          self.sharded) for k, v in block.items()}
    sharding = NamedSharding(self.mesh, P(None, AXIS))
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:])
            for k, v in block.items()}

  def put_scalar(self, value: int):
    """An int32 scalar argument of the compiled dispatches (replicated; cached by value)."""
    if value not in self._scalars:
      x = np.asarray(value, np.int32)
      self._scalars[value] = x if self.name == 'pmap' else \
          jax.make_array_from_callback((), self.replicated, lambda index: x)
    return self._scalars[value]

  def to_host(self, tree) -> dict:
    """Device metrics -> Python floats (the only device-to-host sync)."""
    tree = jax.device_get(tree)
    if self.name == 'pmap':
      tree = jax.tree.map(lambda x: x[0], tree)
    return {k: float(v) for k, v in tree.items()}
