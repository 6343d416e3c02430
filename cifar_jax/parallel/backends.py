"""Backends: the same pure step under pmap, shard_map or jit.

A `Backend` owns the device mesh, places train states, batches and the
device-resident dataset on it and compiles `step.train_step` /
`step.eval_step` and the many-steps-per-call `dispatch` functions for it. All
three give the same numbers: BatchNorm statistics, loss and metrics are
global-batch values.

pmap and shard_map replicate the state over a 1-D `('data',)` mesh. jit runs on
the 2-D `('data', 'model')` mesh of `mesh_shape` and lays the state out by
`sharding` (`parallel.sharding`): replicated, or sharded over the mesh (FSDP,
tensor parallelism), which XLA's SPMD partitioner turns into the collectives.
Batches are split over `'data'` alone.
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
from cifar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib

BACKENDS = ('pmap', 'shard_map', 'jit')
AXIS = mesh_lib.DATA_AXIS
MODEL_AXIS = mesh_lib.MODEL_AXIS


class Backend:
  """Places state and batches on all devices and runs the compiled steps.

  Under `pmap` the state carries a leading device axis; under `shard_map` and
  `jit` it is one replicated global array per leaf and batches are sharded
  along the `('data',)` mesh axis.
  """

  def __init__(self, parallelism: str, devices=None, loop_dispatch: bool | None = None,
               mesh_shape=(-1, 1), sharding: str = 'replicated'):
    """`loop_dispatch`: run a dispatch's steps in one compiled loop (default: except on
    CPU, where XLA runs weight-gradient convolutions ~50x slower in loops; see dispatch.py).
    `mesh_shape`, `sharding`: the mesh and the train state's layout (jit only; pmap and
    shard_map take `(-1, 1)` and `replicated`)."""
    if parallelism not in BACKENDS:
      raise ValueError(f'unknown parallelism {parallelism!r}; choose one of {BACKENDS}')
    if sharding not in sharding_lib.SHARDINGS:
      raise ValueError(f'unknown sharding {sharding!r}; choose one of {sharding_lib.SHARDINGS}')
    self.name = parallelism
    self.sharding = sharding
    # Grouped by process: process p's devices hold rows [p*B/P, (p+1)*B/P) of each global
    # batch, the slice input_pipeline gives process p.
    self.devices = mesh_lib.sorted_devices(devices)
    self.num_devices = len(self.devices)
    self.data_size, self.model_size = mesh_lib.axis_sizes(mesh_shape, self.num_devices)
    if parallelism != 'jit' and (self.model_size != 1 or sharding != 'replicated'):
      raise ValueError(f'parallelism={parallelism} replicates the state over one data axis; '
                       f'mesh_shape={tuple(mesh_shape)} and sharding={sharding} need jit')
    self.loop_dispatch = (self.devices[0].platform != 'cpu' if loop_dispatch is None
                          else loop_dispatch)
    self.mesh = (mesh_lib.make_mesh(self.devices, mesh_shape) if parallelism == 'jit'
                 else jax.sharding.Mesh(np.array(self.devices), (AXIS,)))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    # The train state's shardings: one for all leaves, or a tree (`state_shardings`).
    self.state_sharding = self.replicated
    self.memory = {}  # Compiled memory statistics of the train dispatch (`train_dispatch`).
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
    else:  # Built at first use: they need the state's shardings.
      self._train = None
      self._eval = lambda tta: jax.jit(functools.partial(step_lib.eval_step, tta=tta),
                                       in_shardings=(self.state_sharding, self.sharded),
                                       out_shardings=self.replicated)

  # --- placement ---------------------------------------------------------------
  def state_shardings(self, state):
    """The shardings of a train state like `state` (arrays or ShapeDtypeStructs) under this
    backend's `sharding`, as a tree like it; also what the compiled steps expect from now
    on. Pass it to `step.create_train_state(layout=)` to create the state in place."""
    shardings = sharding_lib.state_shardings(
        state, self.sharding if self.name == 'jit' else 'replicated', self.mesh)
    self.state_sharding = shardings if self.sharding != 'replicated' else self.replicated
    return shardings

  def put_state(self, state):
    """A train state (in `state_sharding`) or another replicated tree (e.g. the carry)."""
    if self.name == 'pmap':
      return jax.tree.map(
          lambda x: jax.device_put(jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x)),
                                   self.sharded), state)
    if isinstance(state, step_lib.TrainState):
      return jax.device_put(state, self.state_sharding)
    return jax.device_put(state, self.replicated)

  def state_bytes_per_device(self, state) -> int:
    """The most bytes of `state` (as created with `state_shardings`) any one device holds
    once placed: under pmap a whole copy."""
    if self.name == 'pmap':
      return sum(x.nbytes for x in jax.tree.leaves(state))
    return sharding_lib.bytes_per_device(state)

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
    if self._train is None:
      self._train = jax.jit(step_lib.train_step, in_shardings=(self.state_sharding, self.sharded),
                            out_shardings=(self.state_sharding, self.replicated),
                            donate_argnums=(0,))
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

    `kinds` names each argument's layout: 'train_state' (`state_sharding`; replicated
    under pmap and shard_map), 'state' (replicated; leading device axis under pmap), 'rows' ([B, ...] split along B), 'batches' ([k, B, ...] split
    along B), 'data' (whole on every device) or 'scalar' (a replicated scalar;
    broadcast under pmap); `out_kinds` each output's. Under jit `fn` also gets
    `constrain`, which shards a [B, ...] tree along B.
    """
    if self.name == 'pmap':
      axes = {'train_state': 0, 'state': 0, 'rows': 0, 'batches': 0, 'data': 0, 'scalar': None}
      return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS,
                      devices=self.devices, in_axes=tuple(axes[k] for k in kinds),
                      donate_argnums=donate)
    specs = {'train_state': P(), 'state': P(), 'rows': P(AXIS), 'batches': P(None, AXIS), 'data': P(), 'scalar': P()}
    if self.name == 'shard_map':
      mapped = jax.shard_map(functools.partial(fn, axis_name=AXIS), mesh=self.mesh,
                             in_specs=tuple(specs[k] for k in kinds),
                             out_specs=tuple(specs[k] for k in out_kinds), check_vma=True)
      return jax.jit(mapped, donate_argnums=donate)
    shardings = lambda ks: tuple(self.state_sharding if k == 'train_state'
                                 else NamedSharding(self.mesh, specs[k]) for k in ks)
    constrain = lambda tree: jax.lax.with_sharding_constraint(tree, self.sharded)
    return jax.jit(functools.partial(fn, axis_name=None, constrain=constrain),
                   in_shardings=shardings(kinds), out_shardings=shardings(out_kinds),
                   donate_argnums=donate)

  def train_dispatch(self, pipeline: str, config):
    """`run(state, carry, feed, num_steps) -> (state, carry)`: one dispatch.

    `feed` is a block of host batches (`put_batches`) or the device-resident
    train split (`put_data`); see `dispatch.train_steps`. With `loop_dispatch`
    it is one compiled call, else one call of the compiled step per step.
    """
    key = ('train', pipeline, id(config))
    if key not in self._dispatch_cache:
      sync, loop = self.name == 'pmap', self.loop_dispatch

      def fn(state, carry, feed, first, last, axis_name, constrain=None):
        make_batch = dispatch.make_batch_fn(pipeline, config, axis_name, constrain)
        return dispatch.train_steps(state, carry, feed, first, last, make_batch=make_batch,
                                    axis_name=axis_name, sync_grads=sync, loop=loop)

      feed_kind = 'batches' if pipeline == 'host' else 'data'
      jitted = self.compile(fn, ('train_state', 'state', feed_kind, 'scalar', 'scalar'),
                            ('train_state', 'state'), donate=(0, 1))
      executable = []

      def compiled(*args):
        # Compiled ahead of time at the first call, to read its memory statistics. The
        # executable checks its arguments itself; others (e.g. a state with another
        # schedule) go through jit's own cache.
        if not executable:
          executable.append(jitted.lower(*args).compile())
          self.memory = _memory_stats(executable[0])
        try:
          return executable[0](*args)
        except TypeError:  # Raised before anything runs or is donated.
          return jitted(*args)

      def run(state, carry, feed, num_steps):
        if loop:
          return compiled(state, carry, feed, self.put_scalar(0), self.put_scalar(num_steps))
        for i in range(num_steps):
          state, carry = compiled(state, carry, feed, self.put_scalar(i), self.put_scalar(i + 1))
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

      compiled = self.compile(fn, ('train_state', 'data'), ('state',))
      self._dispatch_cache[key] = lambda state, feed: compiled(state, feed)[0]
    return self._dispatch_cache[key]

  def eval_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the data axis (the padding is masked)."""
    return -(-requested // self.data_size) * self.data_size

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
    """Device metrics -> Python floats, or numpy arrays for non-scalars (the only
    device-to-host sync)."""
    tree = jax.device_get(tree)
    if self.name == 'pmap':
      tree = jax.tree.map(lambda x: x[0], tree)
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in tree.items()}


def _memory_stats(executable) -> dict:
  """Per-device bytes of a compiled executable's temporaries (XLA's buffer assignment), or {}
  where the platform does not report them."""
  try:
    analysis = executable.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    return {}
  if analysis is None:
    return {}
  if isinstance(analysis, (list, tuple)):  # One per device under some backends.
    analysis = analysis[0]
  return {'temp_bytes_per_device': int(analysis.temp_size_in_bytes)}
