"""Parallelism: the same pure step across many devices.

- `mesh`: the `('data', 'model')` device mesh (`config.mesh_shape`), ordered by
  process so that a model group never spans hosts.
- `sharding`: how the train state is laid out on that mesh (`config.sharding`:
  replicated | fsdp | tensor | fsdp_tensor), as rules over logical axis names
  the models put on their parameters.
- `backend`: `Backend`, the one interface: placement of states, batches and data,
  and the compiled steps and dispatches. One subclass per execution strategy:
  `pmap_backend`, `shard_map_backend`, `jit_backend`; `create_backend` picks one.

Imports run one way: the backends -> backend -> sharding -> mesh.
"""
from cifar_jax.parallel.backend import AXIS, Backend, Kind
from cifar_jax.parallel.jit_backend import JitBackend
from cifar_jax.parallel.mesh import MODEL_AXIS, axis_sizes, make_mesh
from cifar_jax.parallel.pmap_backend import PmapBackend
from cifar_jax.parallel.shard_map_backend import ShardMapBackend
from cifar_jax.parallel.sharding import FSDP_MIN_SIZE, SHARDINGS, bytes_per_device, state_shardings

BACKENDS = {cls.name: cls for cls in (PmapBackend, ShardMapBackend, JitBackend)}


def create_backend(parallelism: str, devices=None, loop_dispatch: bool | None = None,
                   mesh_shape=(-1, 1), sharding: str = 'replicated', members: int = 1,
                   member_sharding: str = 'replicated',
                   fsdp_min_size: int = FSDP_MIN_SIZE) -> Backend:
  """The `Backend` of `config.parallelism` (pmap | shard_map | jit) on `devices` (default:
  all). `mesh_shape` and `sharding` other than (-1, 1) and replicated need jit, as does
  `member_sharding='members'` (a population of `members` split over the devices).
  `fsdp_min_size`: the smallest leaf fsdp splits (`sharding.FSDP_MIN_SIZE`)."""
  if parallelism not in BACKENDS:
    raise ValueError(f'unknown parallelism {parallelism!r}; choose one of {tuple(BACKENDS)}')
  if sharding not in SHARDINGS:
    raise ValueError(f'unknown sharding {sharding!r}; choose one of {SHARDINGS}')
  backend = BACKENDS[parallelism](devices, loop_dispatch, mesh_shape, sharding, members,
                                  member_sharding)
  backend.fsdp_min_size = int(fsdp_min_size)
  if member_sharding != 'replicated' and (parallelism != 'jit' or members % backend.data_size):
    raise ValueError(f'member_sharding={member_sharding} needs parallelism=jit and a '
                     f'population that the data axis ({backend.data_size}) divides')
  if parallelism != 'jit' and (backend.model_size != 1 or sharding != 'replicated'):
    raise ValueError(f'parallelism={parallelism} replicates the state over one data axis; '
                     f'mesh_shape={tuple(mesh_shape)} and sharding={sharding} need jit')
  return backend


__all__ = ['AXIS', 'BACKENDS', 'MODEL_AXIS', 'SHARDINGS', 'Backend', 'JitBackend', 'Kind',
           'PmapBackend', 'ShardMapBackend', 'axis_sizes', 'bytes_per_device', 'create_backend',
           'make_mesh', 'state_shardings']
