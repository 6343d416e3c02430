"""The one interface the trainer sees: a `Backend` places states, batches and data on
the devices and compiles the steps and the many-steps-per-call dispatches for them.

Each execution strategy is one subclass (`pmap_backend`, `shard_map_backend`,
`jit_backend`); they differ only in how an argument lies on the devices (`Kind`)
and how a function is mapped over them (`compile`). What they share is here: the
dispatch functions built from `dispatch.py`, prefetching, scalars, and caches of
compiled functions keyed by what each depends on (the config fields it reads and
the state layout, an explicit argument).

All three give the same numbers: BatchNorm statistics, loss and metrics are
global-batch values.

A population (`members` > 1, `cifar_jax.population`) is one more leading axis of the
state, the batches ([N, B, ...]) and the carry, and the same compiled functions vmap
the step over it. `member_sharding`: `replicated` (every device holds every member and
a slice of each member's batch, as a solo run's) or `members` (jit only: the members
split over the data axis, each device training whole members on their whole batches,
with no communication between devices in the step).
"""
from __future__ import annotations

import collections
import enum
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cifar_jax import dispatch, population, step as step_lib
from cifar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib

AXIS = mesh_lib.DATA_AXIS


class Kind(enum.Enum):
  """How an argument or output of a compiled function lies on the devices."""
  STATE = 'the train state, in the layout given to compile()'
  REPLICATED = 'a small tree (metrics, the carry), whole on every device'
  ROWS = '[B, ...]: split along B over the data axis'
  BATCHES = '[k, B, ...]: k batches, each split along B'
  DATA = 'a dataset, whole on every device'
  SCALAR = 'an int32 scalar (put_scalar)'
  SUMS = "eval sums, whole on every device (a population's: per member and the ensemble's)"


def layout_key(layout) -> tuple:
  """A hashable key of a state layout (one sharding, or a tree of them)."""
  leaves, treedef = jax.tree.flatten(layout)
  return tuple(leaves), treedef


# The config fields a device-pipeline train batch reads (dispatch.device_batch).
DEVICE_BATCH_FIELDS = ('batch_size', 'seed', 'dataset', 'cutout', 'crop_padding',
                       'crop_pad_mode', 'flip')


class Backend:
  """Places state and batches on all devices and runs the compiled steps.

  The placement methods here are for global arrays (shard_map, jit); subclasses set
  `name` and `sync_grads`, implement `compile` and override what differs.
  """
  name = ''
  sync_grads = False  # pmean gradients in the step (pmap: autodiff leaves them per device).

  def __init__(self, devices=None, loop_dispatch: bool | None = None, mesh_shape=(-1, 1),
               sharding: str = 'replicated', members: int = 1,
               member_sharding: str = 'replicated'):
    """`loop_dispatch`: run a dispatch's steps in one compiled loop (default: except on
    CPU, where XLA runs weight-gradient convolutions ~50x slower in loops; see dispatch.py).
    `mesh_shape`, `sharding`: the mesh and the train state's layout (jit only).
    `members`, `member_sharding`: a population's size and layout (see above)."""
    self.members, self.member_sharding = int(members), member_sharding
    # The device axis a population's members are split over (jit's 'members' layout).
    self.member_axis = AXIS if self.members > 1 and member_sharding == 'members' else None
    # Grouped by process: process p's devices hold rows [p*B/P, (p+1)*B/P) of each global
    # batch, the slice the host pipeline gives process p.
    self.devices = mesh_lib.sorted_devices(devices)
    self.num_devices = len(self.devices)
    self.data_size, self.model_size = mesh_lib.axis_sizes(mesh_shape, self.num_devices)
    self.sharding = sharding
    self.fsdp_min_size = sharding_lib.FSDP_MIN_SIZE  # (create_backend's argument.)
    self.loop_dispatch = (self.devices[0].platform != 'cpu' if loop_dispatch is None
                          else loop_dispatch)
    self.mesh = self._make_mesh(mesh_shape)
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    self.memory = {}  # Compiled memory statistics of the train dispatch (`train_dispatch`).
    self.train_executable = None  # The last train dispatch compiled.
    self._compiled = {}  # Compiled functions, by what they depend on.
    self._scalars = {}  # Scalar arguments on the devices, by value.

  def _make_mesh(self, mesh_shape) -> jax.sharding.Mesh:
    del mesh_shape  # A 1-D data mesh; the jit backend overrides this.
    return jax.sharding.Mesh(np.array(self.devices), (AXIS,))

  # --- placement (per strategy) ---------------------------------------------------------
  def state_layout(self, state):
    """The shardings of a train state like `state` (arrays or ShapeDtypeStructs): one
    sharding or a tree like it. Pure; pass it to `step.create_train_state(layout=)` to
    create the state in place, and to `put_state` and the compiled functions."""
    del state
    return self.replicated

  def put_state(self, tree, layout=None):
    """A train state (in `layout`, default replicated) or another replicated tree."""
    return jax.device_put(tree, self.replicated if layout is None else layout)

  def get_state(self, state: step_lib.TrainState) -> step_lib.TrainState:
    """The state as global (unreplicated) arrays, e.g. for checkpoints."""
    return state

  def state_bytes_per_device(self, state) -> int:
    """The most bytes of `state` (placed in its layout) any one device holds."""
    return sharding_lib.bytes_per_device(state)

  def put_carry(self, tree):
    """The loop's carry (`dispatch.new_carry`) in the layout the dispatch takes it in."""
    return self.put_state(tree)

  def abstract_carry(self, members: int = 1):
    """`put_carry(dispatch.new_carry(members))` as ShapeDtypeStructs (global arrays)."""
    sharding = self.sharded if self.member_axis is not None else self.replicated
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        dispatch.new_carry(members))

  def put_batch(self, batch: dict) -> dict:
    """This process's slice of a global batch (host numpy) -> device arrays, async."""
    return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

  def put_batches(self, block: dict) -> dict:
    """This process's slices of k global batches {'image': [k, b, ...], ...} -> devices."""
    sharding = NamedSharding(self.mesh, P(None, AXIS))
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:])
            for k, v in block.items()}

  def put_data(self, arrays: dict) -> dict:
    """Host numpy arrays -> one whole copy on every device (each process fills only its
    own devices; every process must pass the same arrays)."""
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x)
    return {k: put(v) for k, v in arrays.items()}

  def _scalar(self, x: np.ndarray):
    return jax.make_array_from_callback((), self.replicated, lambda index: x)

  def to_host(self, tree) -> dict:
    """Device metrics -> Python floats, or numpy arrays for non-scalars (the only
    device-to-host sync); nested dicts stay nested."""
    return _floats(jax.device_get(tree))

  def compile(self, fn, in_kinds: tuple[Kind, ...], out_kinds: tuple[Kind, ...], layout=None,
              donate: tuple[int, ...] = ()):
    """`fn(*args, axis_name=..)` (per device, or global under jit) compiled for this
    backend; `in_kinds`/`out_kinds` say how each argument/output lies (`Kind`), `layout`
    is the state's (for `Kind.STATE`). Under jit `fn` also gets `constrain`, which
    shards a [B, ...] tree along B."""
    raise NotImplementedError

  # --- shared -----------------------------------------------------------------------------
  def put_scalar(self, value: int):
    """An int32 scalar argument of the compiled functions (cached by value)."""
    if value not in self._scalars:
      self._scalars[value] = self._scalar(np.asarray(value, np.int32))
    return self._scalars[value]

  def prefetch(self, batches: Iterable[dict], size: int = 2, put=None) -> Iterator[dict]:
    """Keeps `size` batches in flight to the devices so steps never wait on a copy.
    `put` places one host batch (default `put_batch`; `put_batches` for blocks)."""
    put = put or self.put_batch
    queue = collections.deque()
    for batch in batches:
      queue.append(put(batch))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def eval_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the data axis (the padding is masked)."""
    return -(-requested // self.data_size) * self.data_size

  def _cached(self, key, build):
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  def train_step(self, state, batch, layout=None):
    """One `step.train_step` on a placed global batch."""
    layout = self.state_layout(state) if layout is None else layout

    def build():
      def fn(state, batch, axis_name, constrain=None):
        del constrain
        step_fn = population.train_step if self.members > 1 else step_lib.train_step
        return step_fn(state, batch, axis_name, self.sync_grads)
      return self.compile(fn, (Kind.STATE, Kind.ROWS), (Kind.STATE, Kind.REPLICATED), layout,
                          donate=(0,))
    return self._cached(('train_step', layout_key(layout)), build)(state, batch)

  def eval_step(self, state, batch, tta: int = 0, layout=None):
    """`step.eval_step` with test-time augmentation level `tta` (compiled once per level)."""
    layout = self.state_layout(state) if layout is None else layout

    def build():
      def fn(state, batch, axis_name, constrain=None):
        del constrain
        if self.members > 1:
          return (population.eval_step(state, batch, tta, axis_name, self.member_axis),)
        return (step_lib.eval_step(state, batch, axis_name, tta),)
      compiled = self.compile(fn, (Kind.STATE, Kind.ROWS), (Kind.SUMS,), layout)
      return lambda state, batch: compiled(state, batch)[0]
    return self._cached(('eval_step', tta, layout_key(layout)), build)(state, batch)

  def train_dispatch(self, pipeline: str, config, layout=None):
    """`run(state, carry, feed, num_steps) -> (state, carry)`: one dispatch.

    `feed` is a block of host batches (`put_batches`) or the device-resident
    train split (`put_data`); see `dispatch.train_steps`. With `loop_dispatch`
    it is one compiled call, else one call of the compiled step per step.
    """
    layout = self.replicated if layout is None else layout
    fields = tuple(config[f] for f in DEVICE_BATCH_FIELDS) if pipeline == 'device' else ()
    key = ('train', pipeline, fields, self.loop_dispatch, layout_key(layout))
    return self._cached(key, lambda: self._build_train_dispatch(pipeline, config, layout))

  def _train_jitted(self, pipeline: str, config, layout):
    """The jitted (not yet compiled) train dispatch `(state, carry, feed, first, last)`."""
    sync, loop, members = self.sync_grads, self.loop_dispatch, self.members

    def fn(state, carry, feed, first, last, axis_name, constrain=None):
      make_batch = dispatch.make_batch_fn(pipeline, config, axis_name, constrain, members,
                                          self.member_axis)
      return dispatch.train_steps(state, carry, feed, first, last, make_batch=make_batch,
                                  axis_name=axis_name, sync_grads=sync, loop=loop,
                                  members=members)

    feed_kind = Kind.BATCHES if pipeline == 'host' else Kind.DATA
    return self.compile(fn, (Kind.STATE, Kind.REPLICATED, feed_kind, Kind.SCALAR, Kind.SCALAR),
                        (Kind.STATE, Kind.REPLICATED), layout, donate=(0, 1))

  def abstract_scalar(self) -> jax.ShapeDtypeStruct:
    """An int32 scalar argument (`put_scalar`) as a shape, for lowering without devices."""
    return jax.ShapeDtypeStruct((), np.int32, sharding=self.replicated)

  def lower_train(self, pipeline: str, config, state, carry, feed):
    """The train dispatch lowered (`jax.stages.Lowered`) for arguments shaped like these:
    arrays, or ShapeDtypeStructs with shardings on this backend's mesh (`--mode=compile`
    lowers for devices that are not here)."""
    jitted = self._train_jitted(pipeline, config, self.state_layout(state))
    scalar = self.abstract_scalar()
    return jitted.lower(state, carry, feed, scalar, scalar)

  def lower_eval(self, config, tta: int, state, feed):
    """The whole-split eval of the device pipeline (`eval_dispatch`) lowered for these."""
    return self._eval_jitted(config, tta, self.state_layout(state)).lower(state, feed)

  def train_peak_bytes(self, pipeline: str, config, state, carry, feed) -> int | None:
    """Per-device peak bytes of the train dispatch on arguments shaped like these (arrays
    or ShapeDtypeStructs), from XLA's memory analysis of it compiled, not run; None where
    the platform does not report it."""
    executable = self.lower_train(pipeline, config, state, carry, feed).compile()
    return memory_stats(executable).get('peak_bytes_per_device')

  def _build_train_dispatch(self, pipeline: str, config, layout):
    loop = self.loop_dispatch
    jitted = self._train_jitted(pipeline, config, layout)
    executable = []

    def compile_once(*args):
      # Compiled ahead of time, at the first call or by `run.compile`, to read its memory
      # statistics before anything runs.
      if not executable:
        executable.append(jitted.lower(*args).compile())
        self.memory = memory_stats(executable[0])
        self.train_executable = executable[0]  # (Its HLO: tests, benchmarks.)
      return executable[0]

    def compiled(*args):
      # The executable checks its arguments itself; others (e.g. a state with another
      # schedule) go through jit's own cache.
      try:
        return compile_once(*args)(*args)
      except TypeError:  # Raised before anything runs or is donated.
        return jitted(*args)

    def ahead(state, carry, feed) -> dict:
      """Compiles the dispatch for these arguments without running it: its memory stats."""
      compile_once(state, carry, feed, self.put_scalar(0), self.put_scalar(1))
      return self.memory

    def run(state, carry, feed, num_steps, on_step=None):
      """`on_step(steps_done, carry)` after each compiled call: once per dispatch with
      `loop_dispatch`, else after each step (the progress line sees each finish)."""
      if loop:
        state, carry = compiled(state, carry, feed, self.put_scalar(0),
                                self.put_scalar(num_steps))
        if on_step is not None:
          on_step(num_steps, carry)
        return state, carry
      for i in range(num_steps):
        state, carry = compiled(state, carry, feed, self.put_scalar(i), self.put_scalar(i + 1))
        if on_step is not None:
          on_step(i + 1, carry)
      return state, carry

    run.compile = ahead
    return run

  def eval_dispatch(self, config, tta: int = 0, layout=None):
    """Compiled `(state, test_data) -> sums` over the whole device-resident test split,
    with test-time augmentation level `tta`."""
    layout = self.replicated if layout is None else layout
    key = ('eval', self.eval_batch_size(config.eval_batch_size), config.dataset, tta,
           layout_key(layout))

    def build():
      compiled = self._eval_jitted(config, tta, layout)
      return lambda state, feed: compiled(state, feed)[0]
    return self._cached(key, build)

  def _eval_jitted(self, config, tta: int, layout):
    batch_size = self.eval_batch_size(config.eval_batch_size)
    dataset = config.dataset

    def fn(state, feed, axis_name, constrain=None):
      return (dispatch.eval_all(state, feed, batch_size=batch_size, dataset=dataset,
                                axis_name=axis_name, constrain=constrain, tta=tta,
                                members=self.members, member_axis=self.member_axis),)
    return self.compile(fn, (Kind.STATE, Kind.DATA), (Kind.SUMS,), layout)


def _floats(tree):
  if isinstance(tree, dict):
    return {k: _floats(v) for k, v in tree.items()}
  return float(tree) if np.ndim(tree) == 0 else np.asarray(tree)


def memory_stats(executable) -> dict:
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
  # The peak: arguments and outputs live together, less the donated buffers outputs reuse.
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {'temp_bytes_per_device': int(analysis.temp_size_in_bytes),
          'peak_bytes_per_device': int(peak)}

