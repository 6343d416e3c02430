"""`jax.jit` with shardings on the 2-D `('data', 'model')` mesh of `config.mesh_shape`:
one global program that XLA's SPMD partitioner splits.

The state is laid out by `config.sharding` (`parallel.sharding`: replicated, or
sharded over the mesh for FSDP and tensor parallelism) and batches are split over
`'data'`; XLA inserts the collectives. The step sees global arrays (no axis name).

A population with `member_sharding='members'` lays every leaf of the state and of the
carry out along its member axis over `'data'`: device d holds members d*N/D ..
(d+1)*N/D-1 whole and makes their whole batches itself. The compiled functions are then
`jax.shard_map`s over that axis, not partitioned by XLA: the SPMD partitioner turns a
vmapped convolution (a grouped convolution over members) into all-gathers of the
activations (measured: 45 all-gathers in fast_cnn's step), while each device running
its own members needs no collective in the train step at all
(tests/test_population_training.py reads the compiled HLO for none). Only the eval's
ensemble sums the members' probabilities over the devices.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from cifar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from cifar_jax.parallel.backend import AXIS, Backend, Kind

_SPECS = {Kind.REPLICATED: P(), Kind.ROWS: P(AXIS), Kind.BATCHES: P(None, AXIS), Kind.DATA: P(),
          Kind.SCALAR: P(), Kind.SUMS: P()}


class JitBackend(Backend):
  name = 'jit'
  sync_grads = False

  def _make_mesh(self, mesh_shape) -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(self.devices, mesh_shape)

  def state_layout(self, state):
    if self.members > 1 and self.member_sharding == 'members':
      return jax.tree.map(lambda _: self.sharded, state)
    if self.sharding == 'replicated':
      return self.replicated
    return sharding_lib.state_shardings(state, self.sharding, self.mesh, self.fsdp_min_size)

  def put_carry(self, tree):
    if self.member_axis is None:
      return super().put_carry(tree)
    return jax.device_put(tree, self.sharded)  # [N] sums and first bad steps, by member.

  def compile(self, fn, in_kinds, out_kinds, layout=None, donate=()):
    if self.member_axis is not None:
      return self._compile_by_member(fn, in_kinds, out_kinds, donate)
    layout = self.replicated if layout is None else layout
    shardings = lambda kinds: tuple(layout if k is Kind.STATE else NamedSharding(self.mesh,
                                                                                _SPECS[k])
                                    for k in kinds)
    # [B, ...] trees along B; a population's [N, B, ...] batches (members=True) along B, or
    # along N with member_sharding='members'.
    by_member = NamedSharding(self.mesh, P(AXIS) if self.member_sharding == 'members'
                              else P(None, AXIS))
    constrain = lambda tree, members=False: jax.lax.with_sharding_constraint(
        tree, by_member if members else self.sharded)
    return jax.jit(functools.partial(fn, axis_name=None, constrain=constrain),
                   in_shardings=shardings(in_kinds), out_shardings=shardings(out_kinds),
                   donate_argnums=donate)

  def _compile_by_member(self, fn, in_kinds, out_kinds, donate):
    """`fn` per device on its own members (member_sharding='members'): the state, the
    carry and per-member metrics split along their member axis, the data whole, and a
    population's eval sums per member (split) and for the ensemble (whole)."""
    by_member = {Kind.STATE: P(AXIS), Kind.REPLICATED: P(AXIS), Kind.DATA: P(),
                 Kind.SCALAR: P(), Kind.SUMS: {'members': P(AXIS), 'ensemble': P()}}
    for kind in in_kinds + out_kinds:
      if kind not in by_member:  # Host batches: config_checks allows the device pipeline only.
        raise ValueError(f'member_sharding=members takes no {kind.name} argument')
    mapped = jax.shard_map(functools.partial(fn, axis_name=None), mesh=self.mesh,
                           in_specs=tuple(by_member[k] for k in in_kinds),
                           out_specs=tuple(by_member[k] for k in out_kinds), check_vma=True)
    return jax.jit(mapped, donate_argnums=donate)
