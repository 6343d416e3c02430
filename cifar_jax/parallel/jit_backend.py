"""`jax.jit` with shardings on the 2-D `('data', 'model')` mesh of `config.mesh_shape`:
one global program that XLA's SPMD partitioner splits.

The state is laid out by `config.sharding` (`parallel.sharding`: replicated, or
sharded over the mesh for FSDP and tensor parallelism) and batches are split over
`'data'`; XLA inserts the collectives. The step sees global arrays (no axis name).
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from cifar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from cifar_jax.parallel.backend import AXIS, Backend, Kind

_SPECS = {Kind.REPLICATED: P(), Kind.ROWS: P(AXIS), Kind.BATCHES: P(None, AXIS), Kind.DATA: P(),
          Kind.SCALAR: P()}


class JitBackend(Backend):
  name = 'jit'
  sync_grads = False

  def _make_mesh(self, mesh_shape) -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(self.devices, mesh_shape)

  def state_layout(self, state):
    if self.sharding == 'replicated':
      return self.replicated
    return sharding_lib.state_shardings(state, self.sharding, self.mesh)

  def compile(self, fn, in_kinds, out_kinds, layout=None, donate=()):
    layout = self.replicated if layout is None else layout
    shardings = lambda kinds: tuple(layout if k is Kind.STATE else NamedSharding(self.mesh,
                                                                                _SPECS[k])
                                    for k in kinds)
    constrain = lambda tree: jax.lax.with_sharding_constraint(tree, self.sharded)
    return jax.jit(functools.partial(fn, axis_name=None, constrain=constrain),
                   in_shardings=shardings(in_kinds), out_shardings=shardings(out_kinds),
                   donate_argnums=donate)
