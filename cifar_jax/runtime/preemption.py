"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

Cloud TPU VMs (spot above all) and cluster schedulers send SIGTERM before
killing a job. The loop asks `stop_requested(n)` after every dispatch n; when it
says yes, the loop writes a checkpoint and returns. A second Ctrl-C exits at
once. With several processes, JAX's preemption sync point makes every host
stop (and checkpoint) at the same step: there SIGTERM is left to JAX's own
notifier (started by `jax.distributed.initialize`), which tells every host, and
a Ctrl-C on one host is turned into a SIGTERM to itself for the same path.
"""
from __future__ import annotations

import os
import signal
import sys

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager turning SIGTERM/SIGINT into a stop request the loop polls."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    self._multihost = False

  def __enter__(self):
    self._multihost = jax.process_count() > 1
    # Multi-host: a Python SIGTERM handler would replace JAX's notifier and only this
    # host would stop (the others would then wait in a collective until the heartbeat
    # timeout), so SIGTERM stays with JAX.
    signals = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal_name is not None and signum == signal.SIGINT:
      print('Second interrupt: exiting now without a checkpoint.', file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    self.signal_name = signal.Signals(signum).name
    if self._multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells every host.

  def stop_requested(self, counter: int) -> bool:
    """True when the loop should stop here (all hosts agree on where).

    Every host must call this after every dispatch with the same consecutive
    `counter` (0, 1, 2, ...): JAX's sync point is "the largest counter any host
    has reached, plus one", so a counter that skips values (steps of a
    multi-step dispatch) could step over it and never stop.
    """
    if self._multihost:
      # JAX's preemption service notices SIGTERM on any host and picks that counter, at
      # which every host returns True.
      if multihost_utils.reached_preemption_sync_point(counter):
        self.signal_name = self.signal_name or 'SIGTERM (on some host)'
        return True
      return False
    return self.signal_name is not None
