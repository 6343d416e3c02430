"""Step time while an asynchronous Orbax save runs, against normal step time.

  python benchmarks/checkpoint_overhead.py --config=configs/cpu.py --config.model=tutorial_cnn

Times every step of the compiled train step on a device-resident batch: a
window of steps with no checkpointing, then windows in each of which a save
of the full train state starts at the window's first step (the blocking
part of the save is timed on its own). Prints mean step times and the ratio.
"""
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

from cifar_jax import checkpointing, parallel, step as step_lib  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Training config to measure.', lock_config=False)
flags.DEFINE_integer('window', 10, 'Steps per window.')
flags.DEFINE_integer('saves', 3, 'Windows with a save.')
FLAGS = flags.FLAGS


def timed_steps(backend, state, batch, n):
  times = []
  for _ in range(n):
    t = time.perf_counter()
    state, metrics = backend.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return state, times


def main(_):
  quiet.report()  # Core count and load at start and end.
  config = FLAGS.config
  backend = parallel.create_backend(config.parallelism)
  state = backend.put_state(step_lib.create_train_state(config, jax.random.key(0)))
  size_mb = sum(x.nbytes for x in jax.tree.leaves(backend.get_state(state))) / 2**20
  rs = np.random.RandomState(0)
  batch = backend.put_batch({'image': rs.randn(config.batch_size, 32, 32, 3).astype(np.float32),
                             'label': rs.randint(0, 10, config.batch_size).astype(np.int32)})
  state, _ = timed_steps(backend, state, batch, 3)  # Compile and warm up.
  state, normal = timed_steps(backend, state, batch, FLAGS.window)
  during, blocking = [], []
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpointing.create_manager(workdir, max_to_keep=2)
    for i in range(FLAGS.saves):
      t = time.perf_counter()
      checkpointing.save(manager, backend.get_state(state), 3 + FLAGS.window * (i + 1))
      blocking.append(time.perf_counter() - t)
      state, times = timed_steps(backend, state, batch, FLAGS.window)
      during += times
      manager.wait_until_finished()
    manager.close()
  base, with_save = statistics.mean(normal), statistics.mean(during)
  print(f'{config.model}, batch {config.batch_size}, {jax.device_count()} {jax.devices()[0].platform} '
        f'device(s); train state {size_mb:.1f} MiB')
  print(f'step time, no save:     {base * 1e3:8.1f} ms')
  print(f'step time, during save: {with_save * 1e3:8.1f} ms  ({with_save / base - 1:+.1%})')
  print(f'blocking part of save(): {statistics.mean(blocking) * 1e3:.1f} ms mean '
        f'(first {blocking[0] * 1e3:.1f} ms)')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
