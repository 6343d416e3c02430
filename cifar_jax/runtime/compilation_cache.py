"""JAX's persistent compilation cache: compile a config once per machine, not once per launch.

A resume after preemption, an eval run or a second run of the same config then
loads the compiled executables from disk instead of compiling them again.
"""
from __future__ import annotations

import os

import jax
from absl import logging

# Cache what takes at least this long to compile (JAX's default is 1 s, which leaves
# out the eval step on a CPU); an environment setting wins.
MIN_COMPILE_SECONDS = 0.2


def configure(directory: str) -> str | None:
  """Turns the cache on in `directory` (`~` expanded), or off when it is empty.

  Returns the directory in use (None when off). Call before the first compile.
  """
  if not directory:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  remote = '://' in directory  # gs://: JAX's cache reads and writes it itself (etils.epath).
  path = directory if remote else os.path.abspath(os.path.expanduser(directory))
  try:
    if not remote:
      os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning('Compilation cache off: cannot create %s (%s).', path, e)
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return path
