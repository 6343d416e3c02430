"""`jax.pmap`: one program per device, the state replicated with a leading device axis.

Autodiff under pmap leaves each device its own gradient, so the step pmeans them
(`sync_grads`); BatchNorm statistics, loss and metrics are psummed/pmeaned over
the `'data'` axis. One process only (config_checks says so).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.parallel.backend import AXIS, Backend, Kind

# pmap's in_axes: every array has a leading device axis; scalars are broadcast.
_IN_AXES = {Kind.STATE: 0, Kind.REPLICATED: 0, Kind.ROWS: 0, Kind.BATCHES: 0, Kind.DATA: 0,
            Kind.SCALAR: None, Kind.SUMS: 0}


class PmapBackend(Backend):
  name = 'pmap'
  sync_grads = True

  def put_state(self, tree, layout=None):
    del layout  # Always replicated, one copy per device.
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x)),
                                 self.sharded), tree)

  def get_state(self, state):
    return jax.tree.map(lambda x: x[0], state)

  def state_bytes_per_device(self, state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))  # A whole copy.

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.device_put(v.reshape((self.num_devices, -1) + v.shape[1:]), self.sharded)
            for k, v in batch.items()}

  def put_batches(self, block: dict) -> dict:
    return {k: jax.device_put(
        np.swapaxes(v.reshape((v.shape[0], self.num_devices, -1) + v.shape[2:]), 0, 1),
        self.sharded) for k, v in block.items()}

  def put_data(self, arrays: dict) -> dict:
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback((self.num_devices,) + x.shape, self.sharded,
                                          lambda index: x[None])
    return {k: put(v) for k, v in arrays.items()}

  def _scalar(self, x: np.ndarray):
    return x  # Broadcast by in_axes=None.

  def abstract_scalar(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), np.int32)

  def to_host(self, tree) -> dict:
    return super().to_host(jax.tree.map(lambda x: x[0], jax.device_get(tree)))

  def compile(self, fn, in_kinds, out_kinds, layout=None, donate=()):
    del out_kinds, layout  # Every output has the leading device axis.
    return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS, devices=self.devices,
                    in_axes=tuple(_IN_AXES[k] for k in in_kinds), donate_argnums=donate)
