"""Parallelism: the same pure step across many devices.

- `mesh`: the `('data', 'model')` device mesh (`config.mesh_shape`), ordered by
  process so that a model group never spans hosts.
- `sharding`: how the train state is laid out on that mesh (`config.sharding`:
  replicated | fsdp | tensor | fsdp_tensor), as rules over logical axis names
  the models put on their parameters.
- `backends`: `Backend`, which places states, batches and data and compiles the
  steps under pmap, shard_map or jit.

Imports run one way: backends -> sharding -> mesh.
"""
from cifar_jax.parallel.backends import AXIS, BACKENDS, MODEL_AXIS, Backend
from cifar_jax.parallel.mesh import axis_sizes, make_mesh
from cifar_jax.parallel.sharding import SHARDINGS, bytes_per_device, state_shardings

__all__ = ['AXIS', 'BACKENDS', 'MODEL_AXIS', 'SHARDINGS', 'Backend', 'axis_sizes',
           'bytes_per_device', 'make_mesh', 'state_shardings']
