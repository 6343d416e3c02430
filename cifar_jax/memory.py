"""Does a population's train step fit in device memory, and if not, the largest N that does.

A population's activations, gradients and state grow with its size N, so N = 8 of a model
that trains comfortably alone can exceed a GPU's memory. Left alone that is an allocator
failure deep in the first step (after minutes of compile); instead `check_population_fits`
reads XLA's memory analysis of the compiled dispatch (arguments + outputs - donated +
temporaries, `Backend.train_peak_bytes`) before anything runs and stops with one
`error:` line naming the largest N that fits. That N is found the same way: the dispatch
compiled, not run, for abstract states of n members (every state leaf's member axis
resized): the smallest n, the linear fit's prediction, then bisection. Platforms that
report no memory limit (XLA:CPU) are not checked.
"""
from __future__ import annotations

import bisect

import jax

from cifar_jax import dispatch, parallel
from cifar_jax.errors import UserError


def device_bytes_limit() -> int | None:
  """The bytes one local device may allocate, or None where the platform does not say."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def _gib(n: int) -> str:
  return f'{n / 2**30:.2f} GiB'


def _resized(tree, n: int, axis: int):
  """ShapeDtypeStructs of `tree` with axis `axis` (the member axis) of size `n`, or without
  it for n = 1 (a solo run's)."""
  def resize(x):
    shape = list(x.shape)
    if n == 1:
      del shape[axis]
    else:
      shape[axis] = n
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
  return jax.tree.map(resize, tree)


def _candidates(config, backend) -> list[int]:
  """The population sizes a layout allows, ascending, below config.population."""
  step = backend.data_size if config.population_sharding == 'members' else 1
  return list(range(step, int(config.population), step))


def _abstract(tree, n: int, axis: int, layout=None):
  """`tree` as ShapeDtypeStructs of `n` members (along `axis`), in `layout` (a sharding or
  a tree of them; default: each leaf's own, where it has one)."""
  leaves, treedef = jax.tree.flatten(_resized(tree, n, axis))
  if layout is None:
    shardings = [getattr(x, 'sharding', None) for x in jax.tree.leaves(tree)]
  elif isinstance(layout, jax.sharding.Sharding):
    shardings = [layout] * len(leaves)
  else:
    shardings = jax.tree.leaves(layout)
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                            for x, s in zip(leaves, shardings)])


def peak_bytes(config, backend, state, feed, n: int) -> int | None:
  """Per-device peak bytes of the train dispatch for a population of `n` like `state`
  (n = 1: a solo run), compiled for abstract arguments, not run."""
  pmap = backend.name == 'pmap'  # Its leaves lead with the device axis; no shardings.
  small = parallel.create_backend(config.parallelism, backend.devices,
                                  mesh_shape=tuple(config.mesh_shape), sharding=config.sharding,
                                  members=n, member_sharding=config.population_sharding if n > 1
                                  else 'replicated')
  abstract = _resized(state, n, 1 if pmap else 0)
  if not pmap:
    abstract = _abstract(state, n, 0, small.state_layout(abstract))
  if config.input_pipeline == 'host':  # Blocks [k, B, N, ...] (pmap: [D, k, b, N, ...]).
    feed = _abstract(feed, n, 3 if pmap else 2)
  carry = small.put_carry(dispatch.new_carry(n)) if pmap else small.abstract_carry(n)
  return small.train_peak_bytes(config.input_pipeline, config, abstract, carry, feed)


def largest_population(config, backend, state, feed, limit: int, peak: int) -> int:
  """The largest population size below config.population whose dispatch fits `limit`
  bytes per device, given the full population's `peak` (0: not even the smallest)."""
  sizes = _candidates(config, backend)
  smallest = peak_bytes(config, backend, state, feed, sizes[0]) if sizes else None
  if smallest is None or smallest > limit:
    return 0
  # Memory is close to linear in n: the first size tried is the linear prediction from the
  # smallest and the full population; then bisection between a size that fits and one that
  # does not (so a few compiles, and exact where memory is not quite linear).
  per_member = max(1, (peak - smallest) // (int(config.population) - sizes[0]))
  guess = sizes[0] + (limit - smallest) // per_member
  fits, fails = 0, len(sizes)  # Indices into sizes: sizes[fits] fits; sizes[fails] does not.
  probe = min(max(bisect.bisect_right(sizes, guess) - 1, 1), len(sizes) - 1)
  while fails - fits > 1:
    if peak_bytes(config, backend, state, feed, sizes[probe]) <= limit:
      fits = probe
    else:
      fails = probe
    probe = (fits + fails) // 2
  return sizes[fits]


def check_population_fits(config, backend, run_steps, state, carry, feed) -> dict:
  """Compiles the first dispatch (`run_steps.compile`) and, for a population whose peak
  exceeds the device's memory, raises one `error:` line with the largest N that fits.
  Returns the compiled memory statistics."""
  memory = run_steps.compile(state, carry, feed)
  limit, peak = device_bytes_limit(), memory.get('peak_bytes_per_device')
  if int(config.population) <= 1 or limit is None or peak is None or peak <= limit:
    return memory
  largest = largest_population(config, backend, state, feed, limit, peak)
  fix = (f'the largest that fits is {largest}: --config.population={largest}' if largest else
         'not even the smallest population fits: lower config.batch_size or the model size')
  raise UserError(f'config.population={config.population} needs {_gib(peak)} per device '
                  f'(XLA memory analysis of the compiled step), more than the device\'s '
                  f'{_gib(limit)}; {fix}')
