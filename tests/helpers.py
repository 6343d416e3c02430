"""Shared by the tests that run main.py in subprocesses."""
import os
import socket
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A persistent XLA compilation cache shared by all test subprocesses: each run then
# compiles nothing it has compiled before (halves a tiny run's wall time on 2 cores).
JAX_CACHE = os.path.join(tempfile.gettempdir(), 'cifar_jax_tests_jax_cache')
CACHE_FLAG = f'--config.compilation_cache_dir={JAX_CACHE}'  # Not ~/.cache/cifar_jax.


def subprocess_env(devices=8):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
              JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def main_command(fault: str | None = None) -> list[str]:
  """`python main.py`, or with `fault` ('KIND@STEP') tests/fault_main.py, which runs it
  with that fault injected."""
  if fault:
    return [sys.executable, os.path.join(ROOT, 'tests', 'fault_main.py'), f'--fault={fault}']
  return [sys.executable, 'main.py']


def free_port() -> int:
  """A port free on 127.0.0.1 right now (each multi-process test takes a fresh one)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def checkpoint_arrays(directory: str) -> dict:
  """{path: numpy array} of an Orbax checkpoint item, whatever topology wrote it."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(directory)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(restored)}


def metrics_records(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (metric_logging's own reader)."""
  from cifar_jax import metric_logging  # pylint: disable=import-outside-toplevel
  records = metric_logging.read_records(workdir)
  assert records is not None, f'{workdir} has no metrics.jsonl'
  return records


def logged_steps(workdir: str) -> list[int]:
  """Steps with train metrics so far, for polling a live run (no file yet, or a line being
  written, reads as what is complete)."""
  from cifar_jax import metric_logging  # pylint: disable=import-outside-toplevel
  return [r['step'] for r in metric_logging.read_records(workdir) or [] if 'train_loss' in r]
