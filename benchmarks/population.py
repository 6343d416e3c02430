"""Images/sec of N independent models trained by one vmapped step, against N solo steps.

  python benchmarks/population.py --config=configs/default.py --config.model=fast_cnn
  python benchmarks/population.py --config=configs/cpu.py --config.model_widths="(32,64,64)"

The measurement behind cifar_jax/population.py (many models in one compiled step).
The train step is pure, so `jax.vmap(step.train_step)` over a leading member axis of the
train state and the batch trains N models at once: each member has its own parameters,
BatchNorm statistics, optimizer state and batch (member i initialized with seed i), and
nothing crosses members. For N = 1, 2, 4, 8 on one device, side by side in one process:
- population: one call of the vmapped step per step, N batches of `batch_size`;
- solo: N calls of the plain compiled step per step, one per member (what N separate runs
  would do on one device, without their separate launches, compiles and data uploads).
Printed: images/sec in total and per member, the ratio population / solo, and compile
times. As a check that the vmapped step trains each member as its own run would, member
N-1 after the timed steps is compared with its solo twin (max |difference| of parameters).
"""
import os
import sys
import time
import quiet  # benchmarks/quiet.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from cifar_jax import population as population_lib, step as step_lib  # pylint: disable=wrong-import-position
from cifar_jax.runtime import xla_cpu  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file('config', 'configs/default.py', 'Training config to measure.',
                                lock_config=False)
flags.DEFINE_list('members', ['1', '2', '4', '8'], 'Population sizes N to measure.')
flags.DEFINE_integer('steps', 8, 'Timed steps for each measurement.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps (the compile) before timing.')
FLAGS = flags.FLAGS


def _batches(n: int, batch_size: int, steps: int) -> list[dict]:
  """`steps` device-resident batches of shape [n, batch_size, ...] (a different batch per
  member and step, as each member's own data order would give)."""
  rs = np.random.RandomState(0)
  return [jax.device_put({
      'image': rs.randn(n, batch_size, 32, 32, 3).astype(np.float32),
      'label': rs.randint(0, 10, (n, batch_size)).astype(np.int32)}) for _ in range(steps)]


def _timed(fn, state, batches, warmup):
  """(state after all batches, seconds of the steps after `warmup`, seconds of the first)."""
  t0 = time.perf_counter()
  state, metrics = fn(state, batches[0])
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  for batch in batches[1:warmup]:
    state, metrics = fn(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for batch in batches[warmup:]:
    state, metrics = fn(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0, first


def measure(config, n: int, steps: int, warmup: int) -> dict:
  stacked = population_lib.create_state(config, n)
  states = [population_lib.member(stacked, i) for i in range(n)]  # Each member's solo twin.
  batches = _batches(n, config.batch_size, warmup + steps)
  population_step = jax.jit(population_lib.train_step, donate_argnums=0)
  population, pop_s, pop_first = _timed(population_step, stacked, batches, warmup)
  solo_step = jax.jit(step_lib.train_step)
  solo_s, solo_first, last = 0.0, 0.0, None
  for i, state in enumerate(states):
    member_batches = [{k: v[i] for k, v in b.items()} for b in batches]
    last, seconds, first = _timed(solo_step, state, member_batches, warmup)
    solo_s, solo_first = solo_s + seconds, solo_first or first
  member = population_lib.member(population, n - 1).params
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(last.params)))
  images = n * steps * config.batch_size
  return {'n': n, 'population_ips': images / pop_s, 'solo_ips': images / solo_s,
          'population_compile_s': pop_first, 'solo_compile_s': solo_first, 'max_diff': diff}


def main(argv):
  quiet.report()  # Core count and load at start and end.
  del argv
  config = FLAGS.config
  print(f'JAX {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'model {config.model}{tuple(config.model_widths) or ""}, batch {config.batch_size} '
        f'per member, {FLAGS.steps} timed steps')
  print('   N | population img/s (per member) | N solo img/s (per member) | ratio | '
        'compile pop / solo | member N-1 vs solo')
  for n in map(int, FLAGS.members):
    r = measure(config, n, FLAGS.steps, FLAGS.warmup)
    print(f"{n:4d} | {r['population_ips']:9.0f} ({r['population_ips'] / n:7.0f})     | "
          f"{r['solo_ips']:9.0f} ({r['solo_ips'] / n:7.0f})     | "
          f"{r['population_ips'] / r['solo_ips']:5.2f} | "
          f"{r['population_compile_s']:6.2f} s / {r['solo_compile_s']:5.2f} s | "
          f"max |dparams| {r['max_diff']:.1e}", flush=True)


if __name__ == '__main__':
  xla_cpu.use_fast_convolutions()  # Before the backend starts, as main.py.
  app.run(main)
