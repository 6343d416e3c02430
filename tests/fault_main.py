"""main.py with one fault injected, for the tests: the product's own `loop.Hooks`, no
environment variable and nothing in the compiled step.

  python tests/fault_main.py --fault=KIND@STEP [main.py's flags]

KIND: `nan` (the parameters become NaN after step STEP-1, so step STEP's loss is
NaN), `kill_in_save` (SIGKILL right after the save of step STEP has started) or
`sigterm` (SIGTERM to itself once step STEP is done, as a preemption notice),
`sigstop` (SIGSTOP to itself once step STEP is done: a live run frozen, holding its
workdir) or
`blind_to_space` (free space reads as unknown, so that a save which runs out of
space fails inside Orbax's background writes rather than before it starts; STEP unused).
"""
import functools
import os
import signal
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # pylint: disable=wrong-import-position

import main as cli  # pylint: disable=wrong-import-position
from cifar_jax import loop, train  # pylint: disable=wrong-import-position
from cifar_jax.runtime import faults  # pylint: disable=wrong-import-position

KINDS = ('nan', 'kill_in_save', 'sigterm', 'sigstop', 'blind_to_space')


class FaultHooks(loop.Hooks):

  def __init__(self, kind: str, step: int):
    if kind not in KINDS:
      raise ValueError(f'unknown fault {kind!r}; one of {KINDS}')
    self.kind, self.step = kind, step

  def after_dispatch(self, step, state):
    if self.kind == 'sigterm' and step == self.step:
      os.kill(os.getpid(), signal.SIGTERM)
    if self.kind == 'sigstop' and step == self.step:
      os.kill(os.getpid(), signal.SIGSTOP)
    if self.kind == 'nan' and step == self.step - 1:
      return state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    return state

  def after_save_started(self, step):
    if self.kind == 'kill_in_save' and step == self.step:
      os.kill(os.getpid(), signal.SIGKILL)


if __name__ == '__main__':
  fault = sys.argv.pop(1)
  assert fault.startswith('--fault='), 'usage: fault_main.py --fault=KIND@STEP [flags]'
  kind, at = fault[len('--fault='):].split('@')
  if kind == 'blind_to_space':
    faults.free_bytes = lambda p: None
  train.train_and_evaluate = functools.partial(train.train_and_evaluate,
                                               hooks=FaultHooks(kind, int(at)))
  app.run(cli.main, flags_parser=cli.parse_flags)
