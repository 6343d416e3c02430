"""XLA:CPU convolutions: XLA's own instead of YNNPACK, when the installed jaxlib knows how.

jaxlib 0.10 sends every convolution of the train step through YNNPACK, which is
slower than XLA's own convolutions on every layer of our CIFAR networks (worst
on the 3->24 stem). `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`
turns that off: `fast_cnn`'s bare train step at batch 128 went from 422 to 893
images/sec on the 2-core dev machine, with the same numerics per operation.

The flag is experimental, and XLA *aborts the process* on a flag it does not
know, so it is only added after a child process has started XLA:CPU with it
(once per jaxlib version; the verdict is kept in `~/.cache/cifar_jax`). A user's
own setting of the flag in XLA_FLAGS always wins, and CIFAR_JAX_KEEP_XLA_DEFAULTS=1
leaves XLA_FLAGS alone. It only changes XLA:CPU: on a GPU or TPU machine it
touches nothing but host-side CPU computations.

Call `use_fast_convolutions()` before anything initializes a JAX backend.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

FLAG_NAME = 'xla_cpu_experimental_ynn_fusion_type'
FLAG = f'--{FLAG_NAME}=-individual_convolution'
OPT_OUT = 'CIFAR_JAX_KEEP_XLA_DEFAULTS'
_VERDICTS = os.path.join('~', '.cache', 'cifar_jax', 'xla_cpu_flags.json')


def _jaxlib_version() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return jaxlib.__version__


def flag_supported(verdicts_path: str = _VERDICTS, timeout_s: float = 60.0) -> bool:
  """True if this jaxlib starts XLA:CPU with FLAG (probed in a child process, cached)."""
  path = os.path.expanduser(verdicts_path)
  key = f'{_jaxlib_version()} {FLAG}'
  try:
    with open(path, encoding='utf-8') as f:
      verdicts = json.load(f)
  except (OSError, ValueError):
    verdicts = {}
  if key not in verdicts:
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {FLAG}'.strip(),
               JAX_PLATFORMS='cpu')
    try:
      probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices("cpu")'], env=env,
                             capture_output=True, timeout=timeout_s, check=False)
      verdicts[key] = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
      return False  # Unknown: leave XLA alone, and ask again next time.
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f'{path}.{os.getpid()}.tmp'  # Several processes may probe at once.
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(verdicts, f)
      os.replace(tmp, path)
    except OSError:
      pass  # A read-only home: probe again next launch.
  return bool(verdicts[key])


def use_fast_convolutions(environ=os.environ, supported=flag_supported) -> str:
  """Adds FLAG to XLA_FLAGS unless the user set it or jaxlib lacks it; returns what happened."""
  current = environ.get('XLA_FLAGS', '')
  if environ.get(OPT_OUT, '') not in ('', '0'):
    return f'left at XLA:CPU defaults ({OPT_OUT} is set)'
  if FLAG_NAME in current:
    return 'kept the XLA_FLAGS setting of ' + FLAG_NAME
  if not supported():
    return f'this jaxlib does not accept {FLAG}; convolutions stay on XLA:CPU defaults'
  environ['XLA_FLAGS'] = f'{current} {FLAG}'.strip()
  return f'added {FLAG} to XLA_FLAGS'
