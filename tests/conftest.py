"""Tests run on 8 CPU devices, set before any JAX op."""
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# As main.py does, before any backend starts: XLA's own CPU convolutions. jaxlib 0.12's
# YNNPACK ones are not only slower but shape-dependent: a tensor-parallel resnet18 step on
# a (4, 2) mesh then differs from the replicated one by 3e-2 (relative), 8e-6 without them.
from cifar_jax.runtime import xla_cpu  # pylint: disable=wrong-import-position

xla_cpu.use_fast_convolutions()
# As main.py does: gs:// through gcsfs, not TensorFlow's client (etils caches the choice at
# its first path, so before any).
os.environ.setdefault('EPATH_USE_TF', 'false')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import helpers  # pylint: disable=wrong-import-position


@pytest.fixture
def small_config():
  """A config that trains in seconds: fast_cnn on small synthetic data."""
  return helpers.small_config()


@pytest.fixture(scope='session')
def gcs_server():
  """fake-gcs-server on 127.0.0.1 for the whole session (tests/gcs_emulator.py)."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  emulator = gcs_emulator.Emulator(gcs_emulator.temporary_dir())
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs(gcs_server):
  """The emulator, with its environment set in this process for the test; fails the test
  if anything tried to reach a non-loopback address (here or in a subprocess)."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  previous = gcs_emulator.apply_env(gcs_server.env)
  before = len(gcs_server.non_loopback_connections())
  yield gcs_server
  gcs_emulator.restore_env(previous)
  assert gcs_server.non_loopback_connections()[before:] == []


_buckets = iter(range(10**6))


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  """A directory on each kind of storage: local, and a fresh gs:// bucket."""
  if request.param == 'local':
    return str(tmp_path / 'root')
  gcs = request.getfixturevalue('gcs')
  return f'gs://{gcs.create_bucket(f"storage-{next(_buckets)}")}/root'


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """A tiny run of main.py (helpers.RUN_ARGS), shared by the report and serving tests."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  result = helpers.main_py(f'--workdir={workdir}', *helpers.RUN_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
