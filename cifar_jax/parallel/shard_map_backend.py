"""`jax.shard_map` on a 1-D `('data',)` mesh: one program per device over global arrays,
the state replicated.

With `check_vma=True` the gradient of the replicated parameters is already the
global one (JAX inserts the psum), so the step does not pmean it; BatchNorm
statistics, loss and metrics are reduced over `'data'` explicitly.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from cifar_jax.parallel.backend import AXIS, Backend, Kind

_SPECS = {Kind.STATE: P(), Kind.REPLICATED: P(), Kind.ROWS: P(AXIS), Kind.BATCHES: P(None, AXIS),
          Kind.DATA: P(), Kind.SCALAR: P(), Kind.SUMS: P()}


class ShardMapBackend(Backend):
  name = 'shard_map'
  sync_grads = False

  def compile(self, fn, in_kinds, out_kinds, layout=None, donate=()):
    del layout  # Replicated.
    mapped = jax.shard_map(functools.partial(fn, axis_name=AXIS), mesh=self.mesh,
                           in_specs=tuple(_SPECS[k] for k in in_kinds),
                           out_specs=tuple(_SPECS[k] for k in out_kinds), check_vma=True)
    return jax.jit(mapped, donate_argnums=donate)
