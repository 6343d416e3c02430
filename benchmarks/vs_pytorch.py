"""Our train step against the same network in PyTorch on this CPU, side by side in one run.

  pip install torch   # not a dependency of cifar_jax
  python benchmarks/vs_pytorch.py                                  # configs/cpu.py's model
  python benchmarks/vs_pytorch.py --model=fast_cnn --batch_size=128
  python benchmarks/vs_pytorch.py --torch_python=OTHER_VENV/bin/python   # torch elsewhere

Rows, each the bare train step (one fixed batch, no input pipeline, float32, one
device) timed in its own child process, one after the other:
- ours, jaxlib's default XLA:CPU convolutions (YNNPACK): before;
- ours, XLA's own convolutions (what main.py picks, cifar_jax/runtime/xla_cpu.py): after;
- PyTorch NCHW and PyTorch channels_last (benchmarks/torch_reference.py).
Each of ours is also given as a ratio to PyTorch channels_last (>= 1.0: as fast).
Our step carries what the config trains with (parameter groups, Lookahead); the
PyTorch one is plain SGD with Nesterov momentum, the cheaper of the two.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import quiet  # benchmarks/quiet.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cifar_jax.runtime import xla_cpu  # pylint: disable=wrong-import-position


def child(cmd, keep_xla_defaults=False, python=sys.executable):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', xla_cpu.OPT_OUT)}
  env['JAX_PLATFORMS'] = 'cpu'
  if keep_xla_defaults:
    env[xla_cpu.OPT_OUT] = '1'
  out = subprocess.run([python, *cmd], env=env, capture_output=True, text=True,
                       check=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  quiet.report()  # Core count and load at start and end.
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/cpu.py')
  parser.add_argument('--model', default='', help='Override the config model (fast_cnn|airbench).')
  parser.add_argument('--widths', default='', help='e.g. 64,128,128 (empty: the config\'s).')
  parser.add_argument('--batch_size', type=int, default=0, help='0: the config\'s.')
  parser.add_argument('--steps', type=int, default=12)
  parser.add_argument('--torch_python', default=sys.executable,
                      help='A Python with PyTorch (default: this one).')
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location('config', os.path.join(ROOT, args.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model = args.model or config.model
  widths = args.widths or ','.join(str(w) for w in (config.model_widths
                                                     if model == config.model else ()))
  batch = args.batch_size or config.batch_size
  ours = ['benchmarks/throughput.py', '--bare_only', f'--config={args.config}',
          f'--config.model={model}', f'--config.model_widths=({widths},)' if widths else
          '--config.model_widths=()', f'--config.batch_size={batch}',
          '--config.data_source=synthetic', '--config.half_precision=False',
          f'--steps={args.steps}', '--warmup=3']
  torch_ = ['benchmarks/torch_reference.py', '--json', f'--model={model}', f'--widths={widths}',
            f'--batch_size={batch}', f'--steps={args.steps}']
  rows = {
      'ours, YNNPACK convolutions (before)': child(ours, keep_xla_defaults=True),
      'ours, XLA convolutions (after)': child(ours),
      'PyTorch NCHW': child(torch_, python=args.torch_python),
      'PyTorch channels_last': child(torch_ + ['--channels_last'], python=args.torch_python),
  }
  reference = rows['PyTorch channels_last']['images_per_sec']
  print(f'{model} widths ({widths or "default"}), batch {batch}, bare train step, float32, '
        f'{os.cpu_count()} CPUs; JAX {importlib.metadata.version("jaxlib")}, PyTorch '
        f'{rows["PyTorch NCHW"]["torch"]}')
  for name, row in rows.items():
    rate = row['images_per_sec']
    print(f'  {name:38s} {rate:8.1f} images/sec   {rate / reference:5.2f}x channels_last')


if __name__ == '__main__':
  main()
