"""cifar_jax/loop.py: the loop's helpers, and what a run's trace and hooks see."""
import collections
import glob
import itertools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import dispatch, loop, parallel, train


@pytest.mark.parametrize('step, every, total, due', [
    (10, 5, 12, True), (11, 5, 12, False), (12, 5, 12, True), (3, 100, 3, True), (1, 1, 9, True)])
def test_itstime(step, every, total, due):
  assert loop.itstime(step, every, total) == due


def test_the_meter_averages_and_leaves_paused_time_out():
  backend = parallel.create_backend('jit', jax.devices()[:1])
  meter = loop.TrainMeter(backend)
  carry = {'sums': {k: np.float32(2.0 * i) for i, k in enumerate(dispatch.TRAIN_METRICS)},
           'first_bad': np.int32(-1)}
  meter.add(backend.put_state(carry), 4)
  with meter.paused():
    time.sleep(0.5)  # An eval: not training time.
  record = meter.record(batch_size=8)
  assert record['train_loss'] == 0.0 and record['train_accuracy'] == 0.5
  assert record['images_per_sec'] > 10 * 4 * 8 / 0.5  # The 0.5 s are not in it.
  assert meter.steps == 0 and backend.to_host(meter.carry['sums'])['grad_norm'] == 0.0


def test_progress_counts_the_steps_the_devices_finished(caplog):
  @jax.jit
  def slow(x):  # ~1 s on a CPU: still running when `dispatched` looks at it.
    return jax.lax.fori_loop(0, 4000, lambda i, y: jnp.tanh(y @ y), x)

  x = jnp.ones((256, 256)) / 256
  jax.block_until_ready((slow(x), jnp.copy(x)))  # Compiled off the clock.
  progress = loop.Progress(0, 10, every_secs=0.0)
  lines = lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith('Step ')]
  with caplog.at_level(logging.INFO):
    out = slow(x)
    progress.dispatched(1, out)  # Dispatched, not finished: nothing to report yet.
    assert not lines()
    jax.block_until_ready(out)
    progress.dispatched(10, out + 1)  # The last step: waits for it, then reports it.
  assert lines()[-1].startswith('Step 10/10 (100.0%)')
  assert all(line.split()[1] in ('1/10', '10/10') for line in lines())


class _Recorder(loop.Hooks):

  def __init__(self):
    self.dispatches, self.saves = [], []

  def after_dispatch(self, step, state):
    self.dispatches.append((step, int(np.ravel(jax.device_get(state.step))[0])))
    return state

  def after_save_started(self, step):
    self.saves.append(step)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_hooks_see_every_dispatch_and_save_and_the_trace_holds_exactly_the_window(
    small_config, tmp_path):
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  small_config.update(num_train_steps=9, input_pipeline='device', steps_per_dispatch=4,
                      log_every_steps=3, eval_every_steps=9, checkpoint_every_steps=5,
                      report=False, compilation_cache_dir='', profile_steps='2:4',
                      model_widths=(8, 8, 8))
  hooks = _Recorder()
  train.train_and_evaluate(small_config, str(tmp_path), hooks=hooks)
  ends = list(itertools.accumulate(dispatch.schedule(0, 9, 4, (3, 9, 5), boundaries=(2, 4))))
  assert [s for s, _ in hooks.dispatches] == ends and all(s == t for s, t in hooks.dispatches)
  assert hooks.saves == [5, 9]
  # On CPU a dispatch runs its steps as one call each (dispatch.py): steps 3 and 4 only.
  traces = glob.glob(os.path.join(tmp_path, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1
  names = [event.name for plane in ProfileData.from_file(traces[0]).planes
           for line in plane.lines for event in line.events]
  # One launch event per call, and one per device ('[i] ...') on a multi-device CPU.
  calls = collections.Counter(n.split('] ')[0] if '] ' in n else 'launch' for n in names
                              if 'Execute' in n and n.endswith('(jit_fn)'))
  assert calls['launch'] == 2 and set(calls.values()) == {2}, calls
