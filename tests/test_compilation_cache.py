"""cifar_jax/runtime/compilation_cache.py: the cache on in a directory (a second compile is
read from it), off when empty, and a directory that cannot be made turns it off with a
warning rather than failing the run."""
import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from cifar_jax.runtime import compilation_cache


@pytest.fixture(autouse=True)
def _restore_jax_config():
  """Later tests in this process compile as before: the settings back, the cache object
  (initialized at a compile with the temporary directory) dropped."""
  keys = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
          'jax_persistent_cache_min_compile_time_secs', 'jax_persistent_cache_min_entry_size_bytes')
  before = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  cc.reset_cache()


def test_a_directory_turns_it_on_and_a_compile_is_written_there(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  cc.reset_cache()  # (conftest turned the tests' cache on; main.py configures it first.)
  directory = compilation_cache.configure(str(tmp_path / 'cache'))
  assert directory == str(tmp_path / 'cache') and jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == directory
  jax.jit(lambda x: jnp.cos(x) * 3.25 + 0.125)(jnp.arange(7.0)).block_until_ready()
  assert os.listdir(directory)  # The executable is there for the next launch.


def test_the_minimum_compile_time_is_ours_unless_the_environment_sets_one(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', raising=False)
  compilation_cache.configure(str(tmp_path))
  assert jax.config.jax_persistent_cache_min_compile_time_secs == \
      compilation_cache.MIN_COMPILE_SECONDS


def test_empty_turns_it_off_and_an_unmakeable_directory_warns_and_turns_it_off(tmp_path):
  assert compilation_cache.configure('') is None
  assert not jax.config.jax_enable_compilation_cache
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  assert compilation_cache.configure(str(blocker / 'cache')) is None  # A file in the way.
  assert not jax.config.jax_enable_compilation_cache


def test_home_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert compilation_cache.configure('~/c') == str(tmp_path / 'c')
  assert os.path.isdir(tmp_path / 'c')
