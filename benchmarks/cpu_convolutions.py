"""XLA:CPU convolutions before/after: the bare train step with YNNPACK (jaxlib's default) and
with XLA's own convolutions (what main.py picks, see cifar_jax/runtime/xla_cpu.py), side by side.

  python benchmarks/cpu_convolutions.py --config=configs/cpu.py
  python benchmarks/cpu_convolutions.py --config=configs/cpu.py --config.model=resnet20

XLA reads XLA_FLAGS once per process, so each setting is measured by
`throughput.py --bare_only` in a child process, one after the other, with the
same arguments.
"""
import json
import os
import subprocess
import sys
import quiet  # benchmarks/quiet.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cifar_jax.runtime import xla_cpu  # pylint: disable=wrong-import-position


def bare_step(args, xla_flags, keep_defaults):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', xla_cpu.OPT_OUT)}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  if keep_defaults:
    env[xla_cpu.OPT_OUT] = '1'
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'),
                        '--bare_only', *args], env=env, capture_output=True, text=True,
                       check=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(args):
  quiet.report()  # Core count and load at start and end.
  print(f'bare train step, 1 CPU device, float32, {os.cpu_count()} cores; args: '
        f'{" ".join(args)}', flush=True)
  before = bare_step(args, '', keep_defaults=True)
  print(f'YNNPACK convolutions (jaxlib default): {before["images_per_sec"]:8.1f} images/sec '
        f'(compile {before["compile_s"]:.1f} s)', flush=True)
  if not xla_cpu.flag_supported():
    print(f'this jaxlib does not accept {xla_cpu.FLAG}: nothing to compare')
    return
  after = bare_step(args, xla_cpu.FLAG, keep_defaults=False)
  print(f'XLA convolutions ({xla_cpu.FLAG}): {after["images_per_sec"]:8.1f} images/sec '
        f'(compile {after["compile_s"]:.1f} s)')
  print(f'ratio: {after["images_per_sec"] / before["images_per_sec"]:.2f}x')


if __name__ == '__main__':
  main(sys.argv[1:])
