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

from configs import default  # pylint: disable=wrong-import-position


@pytest.fixture
def small_config():
  """A config that trains in seconds: fast_cnn on small synthetic data."""
  config = default.get_config()
  config.model = 'fast_cnn'
  config.data_source = 'synthetic'
  config.num_synthetic_examples = 256
  config.batch_size = 32
  config.eval_batch_size = 48
  config.num_train_steps = 4
  config.warmup_epochs = 0.0
  config.learning_rate = 0.2
  config.ema_decay = 0.9
  config.label_smoothing = 0.1
  return config


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
