"""How the train state is laid out on the `('data', 'model')` mesh: rules as data.

`config.sharding`:
- `replicated`: every device holds the whole state (data parallelism).
- `fsdp`: ZeRO-3 / fully sharded data parallelism. Every leaf of at least
  `FSDP_MIN_SIZE` elements (params, optimizer state, EMA, Lookahead alike) is
  split over `'data'` along its largest dimension that the axis divides, as
  big_vision's `fsdp` rule; smaller leaves (biases, norms) stay replicated.
  XLA all-gathers a layer's weights where they are used and reduce-scatters
  their gradients.
- `tensor`: Megatron-style tensor parallelism. The models name their parameters'
  axes (`nnx.with_partitioning`): convolution output channels `channels`,
  attention heads `heads`, MLP hidden units `mlp`; `TENSOR_RULES` maps those to
  `'model'` (`nnx.logical_axis_rules`). A dimension the model axis does not
  divide (e.g. 10 classes) stays whole.
- `fsdp_tensor`: both: tensor rules first, then fsdp on what is left.

The same rules apply to the optimizer state, EMA and Lookahead copies, since
they are trees of the same annotated `nnx.Variable`s.
"""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cifar_jax.parallel.mesh import DATA_AXIS, MODEL_AXIS

SHARDINGS = ('replicated', 'fsdp', 'tensor', 'fsdp_tensor')

# Every logical axis name the models use (models.py), and where tensor parallelism puts it.
LOGICAL_AXES = ('channels', 'channels_in', 'embed', 'heads', 'mlp', 'classes', 'tokens')
TENSOR_RULES = (('channels', MODEL_AXIS), ('heads', MODEL_AXIS), ('mlp', MODEL_AXIS))

# Leaves below this many elements are not worth an all-gather: replicated under fsdp.
FSDP_MIN_SIZE = 2**14


def logical_rules(sharding: str) -> tuple[tuple[str, str | None], ...]:
  """The logical-axis -> mesh-axis rules of `sharding` (every name mapped)."""
  tensor = dict(TENSOR_RULES) if sharding in ('tensor', 'fsdp_tensor') else {}
  return tuple((name, tensor.get(name)) for name in LOGICAL_AXES)


def leaf_spec(shape: tuple[int, ...], named: tuple, sharding: str, data: int, model: int,
              fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one leaf of `shape`, given its tensor-rule spec `named`.
  `fsdp_min_size`: the smallest leaf fsdp splits (tests make tiny models' leaves split)."""
  spec = list(named) + [None] * (len(shape) - len(named))
  # A dimension the model axis does not divide stays whole.
  spec = [a if a is None or shape[d] % model == 0 else None for d, a in enumerate(spec)]
  if model == 1:
    spec = [None] * len(shape)
  if sharding in ('fsdp', 'fsdp_tensor') and data > 1 and math.prod(shape) >= fsdp_min_size:
    # The largest dimension not sharded yet that 'data' divides (the first of equals).
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[d] is None and shape[d] % data == 0:
        spec[d] = DATA_AXIS
        break
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def state_shardings(state, sharding: str, mesh: jax.sharding.Mesh,
                    fsdp_min_size: int = FSDP_MIN_SIZE):
  """A tree like `state` (arrays or ShapeDtypeStructs) of NamedShardings for `sharding`."""
  if sharding not in SHARDINGS:
    raise ValueError(f'unknown sharding {sharding!r}; choose one of {SHARDINGS}')
  data, model = (mesh.shape.get(DATA_AXIS, 1), mesh.shape.get(MODEL_AXIS, 1))
  is_variable = lambda x: isinstance(x, nnx.Variable)
  is_spec = lambda x: isinstance(x, P)
  named = []  # One tensor-rule spec per array leaf, in jax.tree.leaves order.
  with nnx.logical_axis_rules(logical_rules(sharding)):
    for item in jax.tree.leaves(state, is_leaf=is_variable):
      # A Variable may hold no array (optax.MaskedNode in a masked optimizer state).
      count = len(jax.tree.leaves(item))
      if is_variable(item) and count:
        named += jax.tree.leaves(nnx.get_partition_spec(item), is_leaf=is_spec) * count
      else:
        named += [P()] * count
  leaves, treedef = jax.tree.flatten(state)
  if len(named) != len(leaves):
    raise AssertionError(f'{len(named)} specs for {len(leaves)} leaves')
  return jax.tree.unflatten(treedef, [
      NamedSharding(mesh, leaf_spec(tuple(x.shape), tuple(spec), sharding, data, model,
                                  fsdp_min_size))
      for x, spec in zip(leaves, named)])


def bytes_per_device(tree, shardings=None) -> int:
  """The most bytes any one device holds of `tree` (arrays, or ShapeDtypeStructs with
  `shardings`: a tree like it, or one sharding for all)."""
  leaves = jax.tree.leaves(tree)
  if shardings is None:
    shardings = [x.sharding for x in leaves]
  elif isinstance(shardings, jax.sharding.Sharding):
    shardings = [shardings] * len(leaves)
  else:
    shardings = jax.tree.leaves(shardings)
  per_device: dict = {}
  for x, s in zip(leaves, shardings):
    nbytes = math.prod(s.shard_shape(tuple(x.shape))) * jax.numpy.dtype(x.dtype).itemsize
    for device in s.device_set:
      per_device[device] = per_device.get(device, 0) + nbytes
  return max(per_device.values(), default=0)
