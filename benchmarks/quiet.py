"""Was the machine quiet? Every benchmark calls `quiet.report()` first thing.

A number taken while other work runs (a test suite, a build, another benchmark) is not
the machine's: on 2 cores one more busy process halves a measurement. So each benchmark
prints, with its result, the core count and the 1-minute load average at its start and
at its end, and the CPU that *other* processes used while it ran: the load average at
the end counts the benchmark's own work too, so the verdict does not rest on it. Above
`LIMIT_PER_CORE` (0.5 per core) at the start, or from others during the run, the last
line says "not quiet: do not quote".

Other processes' CPU = the machine's busy CPU time (/proc/stat) minus this process's
and its waited-for children's (os.times), over the wall time; Linux only (elsewhere the
load averages alone).
"""
from __future__ import annotations

import atexit
import os
import sys
import time

LIMIT_PER_CORE = 0.5


def _busy_seconds() -> float | None:
  """CPU seconds the whole machine has been busy since boot (all cores)."""
  try:
    with open('/proc/stat', encoding='ascii') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
  return busy / os.sysconf('SC_CLK_TCK')


def _own_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _load() -> float:
  return os.getloadavg()[0]


class _Watch:

  def __init__(self, stream):
    self.stream = stream
    self.cores = os.cpu_count() or 1
    self.load_start = _load()
    self.wall = time.monotonic()
    self.busy, self.own = _busy_seconds(), _own_seconds()

  def start_line(self) -> str:
    return f'machine: {self.cores} cores, 1-minute load average {self.load_start:.2f} at start'

  def end_lines(self) -> list[str]:
    seconds = max(time.monotonic() - self.wall, 1e-9)
    load_end = _load()
    others = None
    busy = _busy_seconds()
    if busy is not None and self.busy is not None:
      others = max(0.0, (busy - self.busy) - (_own_seconds() - self.own)) / seconds
    limit = LIMIT_PER_CORE * self.cores
    lines = [f'machine: {self.cores} cores, 1-minute load average {self.load_start:.2f} at '
             f'start, {load_end:.2f} at end (this benchmark\'s own work included)' +
             (f'; other processes used {others:.2f} cores on average during its '
              f'{seconds:.0f} s' if others is not None else '')]
    problems = []
    if self.load_start > limit:
      problems.append(f'the load at start, {self.load_start:.2f}, is above {LIMIT_PER_CORE} '
                      'per core')
    if others is not None and others > limit:
      problems.append(f'other processes used {others:.2f} cores, above {LIMIT_PER_CORE} per '
                      'core')
    if others is None and load_end > limit + self.cores:  # No /proc: the load alone.
      problems.append(f'the load at end, {load_end:.2f}, is above this benchmark\'s own')
    lines.append('machine: not quiet: do not quote (' + '; '.join(problems) + ')' if problems
                 else 'machine: quiet')
    return lines


def report(stream=None) -> None:
  """Prints the start line now and the end lines when the process exits. `stream`:
  default stdout; a worker whose stdout a parent parses passes sys.stderr."""
  watch = _Watch(stream)

  def out(line):
    print(line, file=watch.stream or sys.stdout, flush=True)

  out(watch.start_line())
  atexit.register(lambda: [out(line) for line in watch.end_lines()])
