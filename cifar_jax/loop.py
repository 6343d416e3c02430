"""The training loop's cross-cutting concerns, one small helper each, so that
`train.train_and_evaluate`'s loop reads as what it does.

- `itstime(step, every, total)`: is a log/eval/checkpoint due after `step`?
- `TrainMeter`: the train metrics summed on the devices between two records,
  and the training time they took (evals and saves excluded).
- `Progress`: the progress line; it counts the steps the devices have
  *finished*, not the steps dispatched (dispatch runs ahead of the devices).
- `ProfileWindow`: a profiler trace of exactly the steps of `config.profile_steps`.
- `Hooks`: where code outside the product (the tests' fault injection, tools)
  may act on a run between dispatches; the default does nothing.
"""
from __future__ import annotations

import collections
import contextlib
import time

import jax
import jax.numpy as jnp
from absl import logging

from cifar_jax import dispatch, population


def itstime(step: int, every: int, total: int) -> bool:
  """True after every `every`-th step and after the last one."""
  return step % every == 0 or step == total


class Hooks:
  """Called by the loop between dispatches; subclass to act on a run (the tests inject
  faults this way: tests/fault_main.py). Nothing here enters a compiled function."""

  def after_dispatch(self, step: int, state):
    """After the dispatch ending at `step` and its logs, evals and saves; returns the state
    the run goes on with."""
    del step
    return state

  def after_save_started(self, step: int) -> None:
    """Right after the (asynchronous) save of checkpoint `step` has started."""


class TrainMeter:
  """Train metrics summed on the devices (`dispatch.new_carry`) and the steps and
  training seconds they cover; `record` averages them and starts again."""

  def __init__(self, backend):
    self._backend = backend
    self._restart()

  def _restart(self) -> None:
    self.carry = self._backend.put_carry(dispatch.new_carry(self._backend.members))
    self.steps = 0
    self._start, self._paused = time.perf_counter(), 0.0

  def add(self, carry, num_steps: int) -> None:
    self.carry = carry
    self.steps += num_steps

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evals, saves) is not training time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def record(self, batch_size: int) -> dict:
    """The mean of each metric since the last record, and images/sec (syncs here only).
    A population's: the members' mean and per-member lists (`population.train_record`);
    images/sec counts every member's images."""
    sums = self._backend.to_host(self.carry['sums'])
    seconds = max(time.perf_counter() - self._start - self._paused, 1e-9)
    record = {name: total / self.steps for name, total in sums.items()}
    if self._backend.members > 1:
      record = population.train_record(record)
    record['images_per_sec'] = self.steps * batch_size * self._backend.members / seconds
    self._restart()
    return record


class Progress:
  """Logs `Step N/T (x%): r steps/sec, ETA m min` at most every `every_secs` seconds.

  N is the last step whose dispatch the devices have finished (`jax.Array.is_ready`
  on a copy of one of its outputs: no waiting; the outputs themselves are donated to
  the next dispatch), so the rate and the ETA are the devices', not how fast Python
  queues work ahead of them.
  """

  def __init__(self, start_step: int, total_steps: int, every_secs: float = 30.0):
    self._total, self._every = total_steps, every_secs
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._pending = collections.deque()  # (step, an output of the dispatch ending there)

  def dispatched(self, step: int, output: jax.Array) -> None:
    self._pending.append((step, jnp.copy(output)))  # One scalar op per dispatch.
    now = time.perf_counter()
    if now - self._last_time < self._every and step != self._total:
      return
    if step == self._total:
      jax.block_until_ready(self._pending[-1][1])
    finished = self._last_step
    while self._pending and self._pending[0][1].is_ready():
      finished = self._pending.popleft()[0]
    if finished == self._last_step:
      return
    rate = (finished - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self._total - finished) / rate
    logging.info('Step %d/%d (%.1f%%): %.2f steps/sec, ETA %.1f min', finished, self._total,
                 100.0 * finished / self._total, rate, eta / 60)
    self._last_step, self._last_time = finished, now


class ProfileWindow:
  """A profiler trace of steps A+1..B (`config.profile_steps` "A:B") into
  `directory`/plugins/profile; the dispatch schedule starts and stops at A and B."""

  def __init__(self, window: tuple[int, int] | None, directory: str, workdir: str):
    self.window, self._directory, self._workdir = window, directory, workdir
    self._tracing = False

  def before(self, step: int, carry) -> None:
    if self.window and step == self.window[0]:
      jax.block_until_ready(carry)  # Earlier steps stay out of the trace.
      self._tracing = True
      jax.profiler.start_trace(self._directory)  # -> plugins/profile/<time>/*.xplane.pb
      logging.info('Profiling steps %d..%d into %s/plugins/profile.', step + 1, self.window[1],
                   self._workdir)

  def after(self, step: int, carry) -> None:
    if self._tracing and step == self.window[1]:
      jax.block_until_ready(carry)
      jax.profiler.stop_trace()
      self._tracing = False
