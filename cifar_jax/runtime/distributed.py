"""Multi-process start-up: `jax.distributed.initialize` when, and only when, needed.

A pod slice or a GPU cluster runs the same program once per host (or per GPU).
JAX's distributed runtime connects those processes; this module decides how to
start it:

* explicit: `--coordinator_address`, `--num_processes`, `--process_id` (or
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), for any
  cluster and for local tests;
* automatic: on Cloud TPU VMs and in SLURM or Open MPI jobs, JAX finds the
  coordinator, process count and process id itself;
* otherwise a single process, and nothing is started.

Timeouts are bounded: a peer that never arrives fails start-up after
`init_timeout_s`; a peer that dies mid-run is declared dead after
`heartbeat_timeout_s` and every other process then stops.

Coordinator port on Cloud TPU VMs: JAX >= 0.8.1 picks 8482 there, a port the
firewall rule GCP creates with a TPU pod slice does not open (it opens 8476,
JAX's earlier default; jax-ml/jax#35905), so start-up would hang until the
timeout. We keep 8476 unless `JAX_COORDINATOR_PORT` says otherwise.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys
import threading
from typing import Mapping

from absl import logging

from cifar_jax.errors import UserError

TPU_COORDINATOR_PORT = '8476'
_JAX_GRACE_S = 30  # JAX's own start-up deadline, past ours.


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to start: `kind` is 'single', 'explicit' or the detected cluster."""
  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _int(name: str, value) -> int | None:
  if value in (None, ''):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f'{name}={value!r} is not an integer') from None


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  """libtpu installed and TPU chips attached (v2-v4: /dev/accel*, v5+: vfio), or GKE's env.

  libtpu is required too, so a GPU machine with vfio devices is not taken for a TPU VM.
  """
  if environ.get('TPU_WORKER_HOSTNAMES') or environ.get('TPU_PROCESS_ADDRESSES'):
    return True
  if importlib.util.find_spec('libtpu') is None:
    return False
  return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ: Mapping[str, str] = os.environ,
         on_cloud_tpu_vm=None) -> Plan:
  """Decides how this process starts. Pure (given `environ`), so it can be tested."""
  address = coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None
  count = num_processes if num_processes is not None else _int(
      'JAX_NUM_PROCESSES', environ.get('JAX_NUM_PROCESSES'))
  index = process_id if process_id is not None else _int(
      'JAX_PROCESS_ID', environ.get('JAX_PROCESS_ID'))

  if count == 1 and address is None and index in (None, 0):
    return Plan('single')  # Explicitly one process: skip cluster detection.
  if (address, count, index) != (None, None, None):
    missing = [name for name, value in (('--coordinator_address', address),
                                        ('--num_processes', count), ('--process_id', index))
               if value is None]
    if missing:
      raise UserError(f'multi-process start needs {", ".join(missing)} as well; give all three '
                      '(or none, to run one process or let a TPU VM / SLURM / MPI job decide)')
    host, sep, port = address.rpartition(':')
    if not sep or not host or not port.isdigit():
      raise UserError(f'--coordinator_address={address!r} must be HOST:PORT, the address of '
                      'process 0, e.g. 10.0.0.2:8476')
    if count < 1 or not 0 <= index < count:
      raise UserError(f'--process_id={index} must be in [0, --num_processes={count})')
    if count == 1:
      return Plan('single')
    return Plan('explicit', address, count, index)

  if on_cloud_tpu_vm is None:
    on_cloud_tpu_vm = _on_cloud_tpu_vm(environ)
  if on_cloud_tpu_vm:
    return Plan('cloud_tpu')  # Also right for one host: JAX then finds a single process.
  # Inside `srun` (a job step), not the batch script itself.
  if ('SLURM_JOB_ID' in environ and 'SLURM_STEP_NODELIST' in environ and
      _int('SLURM_NTASKS', environ.get('SLURM_NTASKS', 1)) > 1):
    return Plan('slurm')
  if _int('OMPI_COMM_WORLD_SIZE', environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1:
    return Plan('ompi')
  return Plan('single')


def initialize(start: Plan, init_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
  """Starts JAX's distributed runtime for `start` (no-op for a single process).

  Must run before anything touches JAX devices. Failures end in a UserError.
  """
  if start.kind == 'single':
    return
  import jax  # pylint: disable=import-outside-toplevel
  if start.kind == 'cloud_tpu':
    os.environ.setdefault('JAX_COORDINATOR_PORT', TPU_COORDINATOR_PORT)
  kwargs = {}
  if start.kind == 'explicit':
    host_port = start.coordinator_address
    kwargs = dict(coordinator_address=host_port, num_processes=start.num_processes,
                  process_id=start.process_id)
    if start.process_id == 0 and 'JAX_COORDINATOR_BIND_ADDRESS' not in os.environ:
      # Bind exactly the address we were given (loopback stays loopback), not every interface.
      kwargs['coordinator_bind_address'] = host_port
  who = (f'process {start.process_id} of {start.num_processes}' if start.kind == 'explicit'
         else f'{start.kind} job')
  logging.info('Starting the JAX distributed runtime (%s, coordinator %s).', who,
               start.coordinator_address or 'found by JAX')
  # JAX aborts the process (a C++ fatal error and a stack dump) when start-up times out;
  # a watchdog that fires a little earlier ends it with one clear line instead.
  where = start.coordinator_address or 'the coordinator'
  message = (f'error: {who}: not every process joined through {where} within '
             f'{init_timeout_s} s; start every process with the same --coordinator_address and '
             '--num_processes and a distinct --process_id, check that the port is open between '
             'hosts, or raise --distributed_timeout_s')
  joined = threading.Event()

  def watchdog():
    if not joined.wait(init_timeout_s):
      print(message, file=sys.stderr, flush=True)
      os._exit(2)  # pylint: disable=protected-access

  threading.Thread(target=watchdog, daemon=True, name='distributed-watchdog').start()
  try:
    jax.distributed.initialize(initialization_timeout=int(init_timeout_s) + _JAX_GRACE_S,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'{message[len("error: "):]} ({first[:200]})') from None
  finally:
    joined.set()


def describe() -> str:
  """One line for the log: who am I, and what devices do we have."""
  import jax  # pylint: disable=import-outside-toplevel
  return (f'process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'{jax.devices()[0].platform} devices')
