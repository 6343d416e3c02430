"""The 2-D device mesh `('data', 'model')` of `config.mesh_shape`.

The batch is split over `'data'`; `'model'` is where tensor parallelism splits
a layer's channels, heads or hidden units. Devices are ordered by process, so
the devices of one `'model'` group are consecutive and, when the model axis
divides each process's device count, on one host: tensor parallelism's
per-layer collectives then never cross the network.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

DATA_AXIS = 'data'
MODEL_AXIS = 'model'


def axis_sizes(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """(data, model) sizes of `mesh_shape` on `num_devices` devices; one entry may be -1
  (all the devices the other leaves). Raises ValueError naming the problem."""
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != 2 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f'mesh_shape={shape} must be two positive sizes (data, model), one of '
                     'which may be -1, e.g. (-1, 1) or (4, 2)')
  data, model = shape
  if data == -1:
    data = num_devices // model if num_devices % model == 0 else 0
  elif model == -1:
    model = num_devices // data if num_devices % data == 0 else 0
  if data * model != num_devices:
    raise ValueError(f'mesh_shape={shape} does not cover the {num_devices} devices '
                     f'(data x model must equal {num_devices})')
  return data, model


def sorted_devices(devices=None) -> list:
  """`devices` (default: all) grouped by process, each process's in id order."""
  devices = devices if devices is not None else jax.devices()
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh(devices, mesh_shape: Sequence[int] = (-1, 1)) -> jax.sharding.Mesh:
  """A `('data', 'model')` mesh with Auto axes (XLA propagates shardings through the
  convolutions; `jax.make_mesh` would default to Explicit axes in this JAX)."""
  devices = sorted_devices(devices)
  shape = axis_sizes(mesh_shape, len(devices))
  return jax.sharding.Mesh(np.array(devices).reshape(shape), (DATA_AXIS, MODEL_AXIS))
