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
  progress = loop.Progress(0, 10, every_secs=0.0, poll_secs=None)
  lines = lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith('Step ')]
  with caplog.at_level(logging.INFO):
    out = slow(x)
    progress.dispatched(1, out)  # Dispatched, not finished: nothing to report yet.
    assert not lines()
    jax.block_until_ready(out)
    progress.poll()
    assert lines() == ['Step 1/10 (10.0%): no rate or ETA until a step after the first '
                       '(compile) has finished']
    progress.dispatched(10, out + 1)  # The last step: waits for it, then reports it.
  assert lines()[-1].startswith('Step 10/10 (100.0%): ') and 'ETA 0.0 min' in lines()[-1]


class _FakeClock:
  now = 0.0

  def __call__(self):
    return self.now


class _Done:
  """A step's done-marker: ready once the fake clock passes `at`."""

  def __init__(self, clock, at):
    self._clock, self._at = clock, at

  def is_ready(self):
    return self._clock() >= self._at


def _simulated_run(per_step_markers: bool):
  """The real-data configs/cpu.py run's shape: 776 steps, 97 per dispatch (an epoch),
  the first step alone with 240 s of compile, 2.2 s a step, a 15 s eval after each epoch.
  Python queues a whole dispatch at once, as the asynchronous dispatch does. Returns
  (the lines with the fake times they were logged at, each step's finish time)."""
  clock = _FakeClock()
  total, k = 776, 97
  progress = loop.Progress(0, total, every_secs=30.0, poll_secs=None, clock=clock)
  finish, t = {1: 240.0}, 240.0
  for step in range(2, total + 1):
    t += 2.2 + (15.0 if (step - 1) % k == 0 else 0.0)
    finish[step] = t
  sizes = dispatch.schedule(0, total, k, (k,))
  ends = list(itertools.accumulate(sizes))
  lines, queued = [], 0
  for now in np.arange(0.0, finish[total], 1.0):  # The progress thread's once a second.
    clock.now = now
    while queued < len(ends) and (queued == 0 or finish[ends[queued - 1]] <= now):
      first = ends[queued - 1] + 1 if queued else 1
      for step in (range(first, ends[queued] + 1) if per_step_markers else [ends[queued]]):
        progress.dispatched(step, _Done(clock, finish[step]))  # (Never the last step here.)
      queued += 1
    line = progress.poll()
    if line:
      lines.append((now, line))
  return lines, finish


@pytest.mark.parametrize('per_step_markers', [True, False], ids=['cpu_steps', 'one_call'])
def test_progress_is_true_from_its_first_line_when_a_dispatch_is_an_epoch(per_step_markers):
  lines, finish = _simulated_run(per_step_markers)
  assert lines and lines[0][0] - finish[1] <= 60  # Within a minute of the first step.
  with_eta = 0
  for now, line in lines:
    done = int(line.split()[1].split('/')[0])
    assert finish[done] <= now, line  # Finished steps, not those dispatched,
    if per_step_markers:  # and all of them.
      assert done == 776 or finish[done + 1] > now - 1.0, (now, line)
    if 'steps/sec' not in line:
      assert with_eta == 0 and 'no rate or ETA' in line, line  # None until it can be computed.
      continue
    with_eta += 1
    eta = float(line.split('ETA ')[1].split()[0]) * 60
    true = finish[776] - now
    assert true / 2 <= eta <= 2 * true or abs(eta - true) < 60, (now, line, true)
  assert with_eta >= len(lines) - (1 if per_step_markers else 8)


def test_progress_lines_keep_coming_while_the_loop_waits_on_a_long_dispatch(caplog):
  """Its thread reports the finished steps of a dispatch of slow fake steps (0.05 s each)
  queued at once, while the caller sleeps."""
  start = time.perf_counter()
  with caplog.at_level(logging.INFO), loop.Progress(0, 40, every_secs=0.2, poll_secs=0.02) as p:
    for step in range(1, 40):
      p.dispatched(step, _Done(time.perf_counter, start + 0.05 * step))
    time.sleep(1.6)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Step ')]
  assert len(lines) >= 4, lines
  counts = [int(line.split()[1].split('/')[0]) for line in lines]
  assert counts == sorted(counts) and 1 <= counts[0] < counts[-1] <= 39, lines
  rates = [float(line.split(': ')[1].split()[0]) for line in lines if 'steps/sec' in line]
  assert rates and all(10 < r < 30 for r in rates), lines  # 20 steps/sec.


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
                      report=False, profile_steps='2:4',
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
