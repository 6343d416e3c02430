"""Images/sec of the bare step, of the whole loop with each input pipeline, input capacity, compile.

  python benchmarks/throughput.py --config=configs/cpu.py --config.data_source=synthetic
  python benchmarks/throughput.py --config=configs/cpu.py --config.data_source=synthetic \
      --config.batch_size=2 --steps_per_dispatch=16 --steps=400      # dispatch overhead
  python benchmarks/throughput.py --config=configs/gpu.py --config.data_source=synthetic

All in one process, one config, side by side:
- bare step: the backend's compiled `train_step` on one device-resident batch
  (no input pipeline, no host work): the limit;
- the whole `train.train_and_evaluate` loop with `input_pipeline=host` (tf.data,
  one step per call), and with `input_pipeline=device` and `--steps_per_dispatch`
  steps per call, as images/sec (its metrics.jsonl, first window left out) and as
  a ratio to the limit;
- compile: the loop's `compile_seconds` (first step, compile included) with a
  cold and then a warm persistent compilation cache (in-memory caches cleared);
- input capacity: images/sec each pipeline delivers ready on the devices, no model.
The host-pipeline measurements need TensorFlow and are skipped without it.
"""
import json
import os
import statistics
import sys
import tempfile
import time
import quiet  # benchmarks/quiet.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from cifar_jax import dispatch, parallel, step as step_lib, train  # pylint: disable=wrong-import-position
from cifar_jax.data import sources as data_sources  # pylint: disable=wrong-import-position
from cifar_jax.runtime import compilation_cache, xla_cpu  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Training config to measure.', lock_config=False)
flags.DEFINE_integer('steps', 40, 'Timed steps for each measurement.')
flags.DEFINE_integer('warmup', 5, 'Untimed steps (compile) before timing.')
flags.DEFINE_integer('steps_per_dispatch', 16, 'Steps per call for the device-pipeline loop.')
flags.DEFINE_integer('capacity_batches', 30, 'Batches timed for each input capacity.')
flags.DEFINE_integer('capacity_batch_size', 1024, 'Global batch for the input capacity.')
flags.DEFINE_bool('bare_only', False, 'Only the bare step, as one JSON line (for other scripts).')
FLAGS = flags.FLAGS


def bare_step(config, steps, warmup):
  """(images/sec, compile seconds) of the compiled step on a device-resident batch."""
  backend = parallel.create_backend(config.parallelism)
  state = backend.put_state(step_lib.create_train_state(config, jax.random.key(0)))
  rs = np.random.RandomState(0)
  batch = backend.put_batch({
      'image': rs.randn(config.batch_size, 32, 32, 3).astype(np.float32),
      'label': rs.randint(0, 10, config.batch_size).astype(np.int32)})
  t = time.perf_counter()
  state, metrics = backend.train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  for _ in range(warmup - 1):
    state, metrics = backend.train_step(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = backend.train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps * config.batch_size / (time.perf_counter() - t), compile_s


def whole_loop(config, steps, warmup, pipeline, steps_per_dispatch):
  """(images/sec that main.py's loop logs past its first window, compile_seconds)."""
  config = config.copy_and_resolve_references()
  config.input_pipeline = pipeline
  config.steps_per_dispatch = steps_per_dispatch
  # Logging windows of `warmup` steps (the first holds the compile), at least one dispatch.
  window = max(warmup, steps_per_dispatch)
  config.num_train_steps = window + max(steps // window, 1) * window
  config.log_every_steps = window
  config.eval_every_steps = config.checkpoint_every_steps = 10**9  # Only at the end.
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      records = [r for r in map(json.loads, f) if 'images_per_sec' in r]
  return statistics.median(r['images_per_sec'] for r in records[1:]), records[0]['compile_seconds']


def input_capacity(config, pipeline, num_batches):
  """Images/sec a pipeline delivers as device arrays ready for a step (no model)."""
  backend = parallel.create_backend(config.parallelism)
  data = data_sources.load(config, 'train')
  if pipeline == 'host':
    from cifar_jax.data import host_pipeline as input_pipeline  # pylint: disable=import-outside-toplevel
    batches = backend.prefetch(input_pipeline.train_batches(data, config, 0, num_batches + 3))
    jax.block_until_ready(next(batches))  # tf.data start-up.
    t = time.perf_counter()
    for batch in batches:
      jax.block_until_ready(batch)
    return num_batches * config.batch_size / (time.perf_counter() - t)

  def make(feed, step, axis_name, constrain=None):
    batch = dispatch.device_batch(feed, step, 0, config=config, axis_name=axis_name,
                                  constrain=constrain)
    return batch['image'], batch['label']

  kind = parallel.Kind
  compiled = backend.compile(make, (kind.DATA, kind.SCALAR), (kind.ROWS, kind.ROWS))
  feed = backend.put_data({'images': data.images, 'labels': data.labels})
  steps = [backend.put_scalar(s) for s in range(num_batches + 1)]
  jax.block_until_ready(compiled(feed, steps[-1]))
  t = time.perf_counter()
  for s in steps[:num_batches]:
    out = compiled(feed, s)
  jax.block_until_ready(out)
  return num_batches * config.batch_size / (time.perf_counter() - t)


def main(_):
  quiet.report(sys.stderr if FLAGS.bare_only else None)  # Core count and load at start and end.
  config = FLAGS.config
  print(f'XLA:CPU convolutions: {xla_cpu.use_fast_convolutions()}', flush=True)  # As main.py.
  if FLAGS.bare_only:
    bare, compile_s = bare_step(config, FLAGS.steps, FLAGS.warmup)
    print(json.dumps({'images_per_sec': bare, 'compile_s': compile_s}))
    return
  has_tf = True
  try:
    data_sources.import_tensorflow()
  except ImportError:
    has_tf = False
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({jax.devices()[0].platform}), JAX {jax.__version__}; model {config.model}, batch '
        f'{config.batch_size}, {config.parallelism}, half_precision={config.half_precision}',
        flush=True)
  cache_dir = tempfile.mkdtemp(prefix='cifar_jax_bench_cache_')
  config.compilation_cache_dir = cache_dir
  compilation_cache.configure(cache_dir)  # Before the first compile: JAX reads it once.

  capacity_config = config.copy_and_resolve_references()
  capacity_config.batch_size = FLAGS.capacity_batch_size
  capacity = {p: input_capacity(capacity_config, p, FLAGS.capacity_batches)
              for p in (['host'] if has_tf else []) + ['device']}
  print('input capacity: ' + ' '.join(f'{p}={v:.0f}' for p, v in capacity.items())
        + f' images/sec at batch {FLAGS.capacity_batch_size}' + (f' (device/host {capacity["device"] / capacity["host"]:.1f}x)'
                           if has_tf else ' (no TensorFlow: host skipped)'), flush=True)

  bare, bare_compile = bare_step(config, FLAGS.steps, FLAGS.warmup)
  print(f'bare step:                    {bare:9.1f} images/sec   (compile {bare_compile:.1f} s)',
        flush=True)
  k = FLAGS.steps_per_dispatch
  if has_tf:
    loop, _ = whole_loop(config, FLAGS.steps, FLAGS.warmup, 'host', 1)
    print(f'loop, host pipeline, 1 step/call: {loop:9.1f} images/sec   ratio to bare '
          f'{loop / bare:.3f}', flush=True)
  loop, cold = whole_loop(config, FLAGS.steps, FLAGS.warmup, 'device', k)
  print(f'loop, device pipeline, {k} steps/call: {loop:9.1f} images/sec   ratio to bare '
        f'{loop / bare:.3f}', flush=True)
  jax.clear_caches()  # Drop in-memory executables: the next launch finds only the disk cache.
  _, warm = whole_loop(config, FLAGS.steps, FLAGS.warmup, 'device', k)
  print(f'compile_seconds (device loop): cold cache {cold:.2f} s, warm cache {warm:.2f} s '
        f'(warm/cold {warm / cold:.2f})')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
