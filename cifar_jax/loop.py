"""The training loop's cross-cutting concerns, one small helper each, so that
`train.train_and_evaluate`'s loop reads as what it does.

- `itstime(step, every, total)`: is a log/eval/checkpoint due after `step`?
- `TrainMeter`: the train metrics summed on the devices between two records,
  and the training time they took (evals and saves excluded).
- `Progress`: the progress line; it counts the steps the devices have
  *finished*, not the steps dispatched (dispatch runs ahead of the devices), and
  its rate and ETA come from finished work only.
- `ProfileWindow`: a profiler trace of exactly the steps of `config.profile_steps`.
- `Hooks`: where code outside the product (the tests' fault injection, tools)
  may act on a run between dispatches; the default does nothing.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time

import jax
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
  """Logs `Step N/T (x%): r steps/sec, ETA m min` every `every_secs` seconds, true from
  the first line on however long a dispatch is.

  - N is the last step the devices have *finished* (`is_ready()` of something each
    dispatch, or each step, hands to `dispatched`: no waiting), not the last one
    dispatched: Python queues work ahead of the devices.
  - The rate and the ETA come from finished work only: the steps finished since the
    launch's first one (whose time includes the compile) over the time since it
    finished. Until a later step has finished there is no rate and no ETA in the line.
  - Its own thread looks every `poll_secs`, so the lines keep coming while the loop
    waits on a long dispatch; the first one comes `every_secs` after the first step
    finished. Where a dispatch is one call per step (XLA:CPU, dispatch.py) the loop
    reports each step, so an epoch-long dispatch is seen step by step; where it is one
    compiled loop, the first finished dispatch gives the rate.

  A context manager (the thread runs inside it); `clock` and `poll_secs=None` (no
  thread: the caller calls `poll`) are for tests.
  """

  def __init__(self, start_step: int, total_steps: int, every_secs: float = 30.0,
               poll_secs: float | None = 1.0, clock=time.perf_counter):
    self._total, self._every, self._poll_secs, self._clock = total_steps, every_secs, \
        poll_secs, clock
    self._lock = threading.Lock()
    self._pending = collections.deque()  # (step, its done-marker), in step order.
    self._finished = start_step
    self._first = None   # (step, time): the launch's first finished step (compile included).
    self._latest = None  # (step, time): the latest finished step after it.
    self._last_line = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> Progress:
    if self._poll_secs is not None:
      self._thread = threading.Thread(target=self._watch, name='progress', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _watch(self) -> None:
    while not self._stop.wait(self._poll_secs):
      self.poll()

  def dispatched(self, step: int, done) -> None:
    """The work up to `step` has been dispatched; `done.is_ready()` says when it has
    finished (a jax.Array the caller does not donate to later work). The last step is
    waited for and reported at once."""
    with self._lock:
      self._pending.append((step, done))
    if step == self._total:
      jax.block_until_ready(done)
      self.poll(force=True)
    else:
      self.poll()

  def poll(self, force: bool = False) -> str | None:
    """Takes note of what has finished; logs the line when it is due. Returns it."""
    with self._lock:
      now = self._clock()
      while self._pending and self._pending[0][1].is_ready():
        self._finished = self._pending.popleft()[0]
        if self._first is None:
          self._first = (self._finished, now)
        elif self._finished > self._first[0]:
          self._latest = (self._finished, now)
      if self._first is None:
        return None  # Still compiling: nothing has run yet.
      since = self._last_line if self._last_line is not None else self._first[1]
      if not force and now - since < self._every:
        return None
      self._last_line = now
      line = self.line(now)
    logging.info('%s', line)
    return line

  def line(self, now: float) -> str:
    """The ETA: the steps left at the rate so far, less the time since the latest finish
    (with one finish per dispatch, the next may be well under way)."""
    text = f'Step {self._finished}/{self._total} ({100.0 * self._finished / self._total:.1f}%)'
    if self._latest is None:
      return text + ': no rate or ETA until a step after the first (compile) has finished'
    (first_step, first_time), (step, time_) = self._first, self._latest
    rate = (step - first_step) / max(time_ - first_time, 1e-9)
    eta = max(0.0, (self._total - step) / rate - (now - time_))
    return text + f': {rate:.2f} steps/sec, ETA {eta / 60:.1f} min'


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
