"""Checkpoint save and restore time of a config's train state, local against gs://.

  python benchmarks/checkpoint_storage.py --config=configs/cpu.py --emulator
  python benchmarks/checkpoint_storage.py --config=configs/tpu.py --dirs=/tmp/run,gs://BUCKET/run

Saves the full train state `--repeats` times into each workdir's checkpoints/ with the training
loop's own manager (`checkpointing.create_manager`: asynchronous; on gs:// Orbax's
commit-file protocol), timing the blocking part and the time until the save is
committed, then restores the newest one onto the same shardings (`checkpointing.restore`).
Prints medians and the gs:// / local ratios measured in the same run. `--emulator`
starts fake-gcs-server on 127.0.0.1 (tests/gcs_emulator.py, from
requirements-test.txt) and measures `gs://bench/run` there: loopback, in memory, so it
shows the client-side cost of the protocol, not GCS latency or bandwidth.
"""
import os
import statistics
import sys
import tempfile
import time
import quiet  # benchmarks/quiet.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('EPATH_USE_TF', 'false')  # As main.py.

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Training config whose state to save.',
                                lock_config=False)
flags.DEFINE_list('dirs', [], 'Workdirs to compare (local and/or gs://); checkpoints go to '
                  'WORKDIR/checkpoints, as in training.')
flags.DEFINE_bool('emulator', False, 'Also measure gs:// on a local fake-gcs-server.')
flags.DEFINE_integer('repeats', 5, 'Saves per directory.')
FLAGS = flags.FLAGS


def measure(directory, state, shardings, repeats):
  from cifar_jax import checkpointing  # pylint: disable=import-outside-toplevel
  manager = checkpointing.create_manager(directory, max_to_keep=2)
  blocking, committed = [], []
  for i in range(repeats):
    state = state.replace(step=jax.device_put(np.asarray(i + 1, state.step.dtype),
                                              state.step.sharding))  # What restore checks.
    t = time.perf_counter()
    checkpointing.save(manager, state, i + 1)
    blocking.append(time.perf_counter() - t)
    manager.wait_until_finished()
    committed.append(time.perf_counter() - t)
  manager.close()
  restores = []
  for _ in range(repeats):
    reader = checkpointing.open_read_only(directory)
    t = time.perf_counter()
    restored = checkpointing.restore(reader, state, shardings)
    assert restored is not None and int(restored.step) == int(state.step), directory
    jax.block_until_ready(restored)
    restores.append(time.perf_counter() - t)
    reader.close()
  return {'blocking': statistics.median(blocking), 'committed': statistics.median(committed),
          'restore': statistics.median(restores)}


def main(_):
  quiet.report()  # Core count and load at start and end.
  emulator = None
  dirs = list(FLAGS.dirs)
  if FLAGS.emulator:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    'tests'))
    import gcs_emulator  # pylint: disable=import-outside-toplevel
    emulator = gcs_emulator.Emulator(gcs_emulator.temporary_dir())
    gcs_emulator.apply_env(emulator.env)
    emulator.create_bucket('bench')
    dirs += [tempfile.mkdtemp(prefix='bench_'), 'gs://bench/run']
  from cifar_jax import parallel, step as step_lib  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  backend = parallel.create_backend(config.parallelism, jax.devices(), sharding=config.sharding)
  state = step_lib.create_train_state(config, jax.random.key(0), layout=backend.state_layout)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  print(f'{config.model}: train state {mib:.1f} MiB, {len(jax.tree.leaves(state))} arrays, '
        f'{jax.device_count()} {jax.devices()[0].platform} devices; median of {FLAGS.repeats}')
  print(f'{"directory":<40} {"save (blocking)":>16} {"save (committed)":>17} {"restore":>9}')
  results = {}
  for directory in dirs:
    results[directory] = r = measure(directory, state, shardings, FLAGS.repeats)
    print(f'{directory:<40} {r["blocking"]:>15.3f}s {r["committed"]:>16.3f}s '
          f'{r["restore"]:>8.3f}s')
  local = [d for d in dirs if '://' not in d]
  for directory in dirs:
    if '://' in directory and local:
      ratios = ', '.join(f'{k} {results[directory][k] / results[local[0]][k]:.2f}x'
                         for k in ('blocking', 'committed', 'restore'))
      print(f'{directory} / {local[0]}: {ratios}')
  if emulator:
    emulator.stop()


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
