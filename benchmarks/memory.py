"""Will a model fit? Per-device memory of the train step for a grid of model x mesh x
sharding x remat, from the compiler alone: nothing is allocated or trained.

For each combination it builds the abstract train state (`jax.eval_shape`), lays it
out with `parallel.sharding`, compiles the jitted train step for the mesh and prints:
- state/dev: the train state's bytes on one device (params, optimizer state, EMA,
  BatchNorm statistics), from the shardings;
- temp/dev: the compiled step's temporaries on one device (activations, gradients,
  gathered weights), from `compiled.memory_analysis()`;
- total/dev and whether it fits `--device_gib`.

Runs on CPU with simulated devices by default, so a TPU slice can be sized before it
is rented. XLA:CPU's temporaries are its own buffer assignment: the state column is
exact on every platform; the temp column on TPU/GPU differs (and there remat lowers
it; XLA:CPU undoes remat, see docs/large_models.md).

  python benchmarks/memory.py                                      # the table in docs/large_models.md
  python benchmarks/memory.py --models=vit_base --meshes=8x1,2x4 --remat=none,block

With `--populations=1,2,4,8` it prints instead, per model, the peak per device of main.py's
train dispatch (device pipeline: the train split is resident) for a population of each size
under `--population_sharding`, as `cifar_jax/memory.py` computes it when a run starts (there
from the real device's limit, which stops a population that does not fit):

  python benchmarks/memory.py --models=fast_cnn,airbench,resnet18 --populations=1,2,4,8 --devices=1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import quiet  # benchmarks/quiet.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  quiet.report()  # Core count and load at start and end.
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--models', default='wrn28_10,vit_small,vit_giant')
  parser.add_argument('--meshes', default='8x1,4x2', help='data x model, comma-separated')
  parser.add_argument('--shardings', default='replicated,fsdp,fsdp_tensor')
  parser.add_argument('--remat', default='none')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--micro_batches', type=int, default=1)
  parser.add_argument('--optimizer', default='adamw')
  parser.add_argument('--ema_decay', type=float, default=0.0)
  parser.add_argument('--half_precision', action='store_true')
  parser.add_argument('--devices', type=int, default=8,
                      help='simulated CPU devices (0: the real devices, e.g. a TPU slice)')
  parser.add_argument('--device_gib', type=float, default=16.0)
  parser.add_argument('--populations', default='',
                      help='population sizes, comma-separated: the population table instead')
  parser.add_argument('--population_sharding', default='replicated')
  args = parser.parse_args()

  if args.devices:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from cifar_jax import create_train_state, parallel, train_step  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  gib = lambda n: n / 2**30
  if args.populations:
    populations(args, default.get_config, gib)
    return
  print(f'JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; '
        f'batch {args.batch_size} in {args.micro_batches} micro-batches, {args.optimizer}, ema {args.ema_decay}, '
        f'{"bfloat16" if args.half_precision else "float32"} compute; fits = total <= '
        f'{args.device_gib:g} GiB')
  print(f'| model | params | mesh | sharding | remat | state/dev GiB | temp/dev GiB | '
        f'total/dev GiB | fits | compile s |')
  print('| --- | ---: | --- | --- | --- | ---: | ---: | ---: | --- | ---: |')
  for model in args.models.split(','):
    for mesh_text in args.meshes.split(','):
      mesh_shape = tuple(int(x) for x in mesh_text.split('x'))
      for sharding in args.shardings.split(','):
        if sharding == 'tensor' or (sharding.endswith('tensor') != (mesh_shape[1] > 1)):
          continue  # A model axis only with tensor parallelism, and the reverse.
        for remat in args.remat.split(','):
          config = default.get_config()
          config.update(model=model, batch_size=args.batch_size, optimizer=args.optimizer,
                        ema_decay=args.ema_decay, remat=remat, mesh_shape=mesh_shape,
                        sharding=sharding, half_precision=args.half_precision,
                        micro_batches=args.micro_batches)
          backend = parallel.create_backend('jit', mesh_shape=mesh_shape, sharding=sharding)
          state = jax.eval_shape(lambda c=config: create_train_state(c, jax.random.key(0)))
          shardings = backend.state_layout(state)
          batch = {'image': jax.ShapeDtypeStruct((args.batch_size, 32, 32, 3), jnp.float32),
                   'label': jax.ShapeDtypeStruct((args.batch_size,), jnp.int32)}
          rows = NamedSharding(backend.mesh, P(parallel.AXIS))
          t = time.perf_counter()
          compiled = jax.jit(train_step, in_shardings=(shardings, rows),
                             out_shardings=(shardings, backend.replicated),
                             donate_argnums=(0,)).lower(state, batch).compile()
          seconds = time.perf_counter() - t
          state_bytes = parallel.bytes_per_device(state, shardings)
          temp = compiled.memory_analysis().temp_size_in_bytes
          total = state_bytes + temp
          params = sum(x.size for x in jax.tree.leaves(state.params))
          print(f'| {model} | {params / 1e6:,.1f}M | {mesh_text} | {sharding} | {remat} | '
                f'{gib(state_bytes):.2f} | {gib(temp):.2f} | {gib(total):.2f} | '
                f'{"yes" if gib(total) <= args.device_gib else "no"} | {seconds:.0f} |',
                flush=True)


def populations(args, get_config, gib):
  """The population table: peak bytes per device of the train dispatch for each size."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from cifar_jax import create_train_state, memory, parallel  # pylint: disable=import-outside-toplevel
  from cifar_jax.data import cifar  # pylint: disable=import-outside-toplevel

  sizes = [int(n) for n in args.populations.split(',')]
  print(f'JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; '
        f'batch {args.batch_size}, {args.optimizer}, ema {args.ema_decay}, members laid out '
        f'{args.population_sharding}; the whole CIFAR-10 train split on each device')
  print('| model | population | peak/dev GiB | each member more GiB | fits '
        f'{args.device_gib:g} GiB | compile s |')
  print('| --- | ---: | ---: | ---: | --- | ---: |')
  num_train = cifar.SPLIT_SIZES['train']
  for model in args.models.split(','):
    config = get_config()
    config.update(model=model, batch_size=args.batch_size, optimizer=args.optimizer,
                  ema_decay=args.ema_decay, input_pipeline='device', parallelism='jit',
                  population=max(sizes), population_sharding=args.population_sharding,
                  half_precision=args.half_precision)
    backend = parallel.create_backend('jit', members=max(sizes),
                                      member_sharding=args.population_sharding)
    solo = jax.eval_shape(lambda c=config: create_train_state(c, jax.random.key(0), num_train))
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((max(sizes),) + x.shape, x.dtype),
                           solo)
    feed = {'images': jax.ShapeDtypeStruct((num_train, 32, 32, 3), jnp.uint8,
                                           sharding=backend.replicated),
            'labels': jax.ShapeDtypeStruct((num_train,), jnp.int32, sharding=backend.replicated)}
    first = None  # (n, peak) of the smallest size: what each further member adds.
    for n in sizes:
      t = time.perf_counter()
      peak = memory.peak_bytes(config, backend, stacked, feed, n)
      seconds = time.perf_counter() - t
      first = first or (n, peak)
      more = f'{gib(peak - first[1]) / (n - first[0]):.3f}' if n > first[0] else '-'
      print(f'| {model} | {n} | {gib(peak):.2f} | {more} | '
            f'{"yes" if gib(peak) <= args.device_gib else "no"} | {seconds:.0f} |', flush=True)


if __name__ == '__main__':
  main()
