"""The GPU race: airbench94's own PyTorch `train94` against our configs/airbench.py, same pixels.

  pip install airbench==0.1.8      # or --airbench=PATH/airbench-0.1.8.tar.gz (its sdist)
  python benchmarks/vs_airbench.py --config.data_dir=DIR_WITH_cifar-10-binary.tar.gz \
      --runs=5 --throughput        # + benchmarks/throughput.py on configs/gpu.py

One command, back to back on the same GPU, each side in its own child process (so neither
holds GPU memory while the other runs):
1. our CIFAR copy (`data_source=archive`, or `synthetic` to rehearse) is loaded once and
   written as airbench's own `cifar10/train.pt` / `test.pt`: both train on the same pixels;
2. airbench: `benchmarks/airbench_reference.py` (in `--torch_python`, default this Python),
   one untimed warm-up step, then `--runs` runs;
3. ours: `--runs` runs of `train.train_and_evaluate` on the config, seeds `seed + run`;
4. with `--throughput`: `benchmarks/throughput.py --config=configs/gpu.py` (synthetic data).

The timing rule, the same for both: training only, on a synchronized clock: the whitening
init and the epochs. Compile, data upload and evaluation are off the clock. airbench's side
is timed around `train94` with its in-training evals off. Ours is read from the run's
metrics.jsonl: its log windows exclude evals and checkpoints, and each window's end is
synchronized. `compile_seconds` (the first one-step dispatch, compile included) is taken out
of the first window and one step's time is put back. The whitening kernel's host computation
is timed apart and added. Each run's accuracy is its final eval, TTA 2 for both, over the
10,000 test images. Without CUDA (or PyTorch) airbench's side is skipped with a message, and
ours runs on whatever JAX finds: a rehearsal with tiny settings, e.g.
  python benchmarks/vs_airbench.py --config.data_source=synthetic \
      --config.num_synthetic_examples=2048 --config.model_widths="(16, 32, 32)" \
      --config.batch_size=256 --config.num_epochs=2 --runs=2
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import quiet  # benchmarks/quiet.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'airbench.py'),
                                'Our side of the race.', lock_config=False)
flags.DEFINE_integer('runs', 5, 'Timed runs on each side.')
flags.DEFINE_string('airbench', '', 'airbench sdist or source folder (default: installed).')
flags.DEFINE_string('torch_python', sys.executable, 'A Python with PyTorch (airbench side).')
flags.DEFINE_bool('throughput', False, 'Also run benchmarks/throughput.py on configs/gpu.py.')
flags.DEFINE_enum('side', 'both', ['both', 'ours'], 'Internal: ours runs in a child process.')
FLAGS = flags.FLAGS


def training_seconds(records: list[dict], batch_size: int) -> float:
  """Training time of one run from its train records: the sum of its log windows, without
  the first window's compile (its first dispatch is one step, compile included)."""
  train = [r for r in records if 'images_per_sec' in r]
  steps = [r['step'] - p['step'] for p, r in zip([{'step': 0}] + train, train)]
  windows = [n * batch_size / r['images_per_sec'] for n, r in zip(steps, train)]
  per_step = statistics.median(w / n for w, n in zip(windows[1:] or windows, steps[1:] or steps))
  return sum(windows) - train[0]['compile_seconds'] + per_step


def ours(config, runs: int) -> None:
  """One JSON line per run of our trainer (in this process)."""
  import jax  # pylint: disable=import-outside-toplevel
  from cifar_jax import metric_logging, train  # pylint: disable=import-outside-toplevel
  from cifar_jax.data import sources as data_sources  # pylint: disable=import-outside-toplevel
  from cifar_jax.models import airbench  # pylint: disable=import-outside-toplevel
  from cifar_jax.runtime import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.use_fast_convolutions()  # As main.py: before the backend starts.
  images = data_sources.load(config, 'train').images
  print(json.dumps({'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
                    'platform': jax.default_backend()}), flush=True)
  for run in range(runs):
    run_config = config.copy_and_resolve_references()
    run_config.seed = config.seed + run
    run_config.report = False
    start = time.perf_counter()  # The whitening kernel (host, float64), as airbench clocks it.
    if config.model == 'airbench':
      airbench.whitening_kernel(airbench.whitening_data(images, config.dataset))
    whitening = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix='vs_airbench_') as workdir:
      start = time.perf_counter()
      result = train.train_and_evaluate(run_config, workdir)
      wall = time.perf_counter() - start
      records = metric_logging.read_records(workdir)
    print(json.dumps({
        'run': run, 'train_seconds': whitening + training_seconds(records, config.batch_size),
        'accuracy': result['eval_accuracy'], 'tta': result.get('eval_tta'),
        'whitening_seconds': whitening, 'wall_seconds': wall,
        'compile_seconds': records[0].get('compile_seconds')}), flush=True)


def child(cmd: list[str]) -> list[dict]:
  """Runs `cmd`, passing its stderr through; its stdout's JSON lines."""
  out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith('{')]


def summary(name: str, lines: list[dict]) -> dict | None:
  runs = [l for l in lines if 'run' in l]
  for line in lines:
    if 'skipped' in line:
      print(f'{name}: skipped: {line["skipped"]}' +
            (f' (wrote {", ".join(line["wrote"])})' if 'wrote' in line else ''))
  if not runs:
    return None
  acc = [r['accuracy'] for r in runs]
  sec = [r['train_seconds'] for r in runs]
  print(f'{name}: {len(runs)} runs, mean accuracy {100 * statistics.mean(acc):.2f}% '
        f'(each: {" ".join(f"{100 * a:.2f}" for a in acc)}), mean training time '
        f'{statistics.mean(sec):.3f} s (each: {" ".join(f"{s:.3f}" for s in sec)})')
  return {'accuracy': statistics.mean(acc), 'seconds': statistics.mean(sec)}


def main(argv):
  quiet.report()  # Core count and load at start and end.
  del argv
  config = FLAGS.config
  if FLAGS.side == 'ours':
    ours(config, FLAGS.runs)
    return
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cifar_jax.data import sources as data_sources  # pylint: disable=import-outside-toplevel
  work = tempfile.mkdtemp(prefix='vs_airbench_')
  data = os.path.join(work, 'cifar10.npz')
  train_split, test_split = (data_sources.load(config, s) for s in ('train', 'test'))
  np.savez(data, train_images=train_split.images, train_labels=train_split.labels,
           test_images=test_split.images, test_labels=test_split.labels)
  print(f'Same pixels for both: {len(train_split.labels)} train / {len(test_split.labels)} test '
        f'images ({config.data_source}); {FLAGS.runs} runs each.', flush=True)
  gpu = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False) \
      if shutil.which('nvidia-smi') else None
  print(f'GPU: {gpu.stdout.strip() if gpu and gpu.returncode == 0 else "none (no nvidia-smi)"}')
  theirs = child([FLAGS.torch_python, os.path.join(ROOT, 'benchmarks', 'airbench_reference.py'),
                  f'--data={data}', f'--runs={FLAGS.runs}', f'--workdir={work}'] +
                 ([f'--airbench={FLAGS.airbench}'] if FLAGS.airbench else []))
  mine = child([sys.executable, os.path.abspath(__file__), '--side=ours', *sys.argv[1:]])
  versions = {k: v for line in theirs + mine for k, v in line.items()
              if k in ('gpu', 'torch', 'jax', 'device', 'platform')}
  print('Versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()))
  a = summary('airbench94 (PyTorch train94)', theirs)
  b = summary(f'cifar_jax ({config.model}, {config.batch_size}/step)', mine)
  if a and b:
    print(f'ours / airbench: training time {b["seconds"] / a["seconds"]:.2f}x, accuracy '
          f'{100 * (b["accuracy"] - a["accuracy"]):+.2f} points')
  if FLAGS.throughput:
    subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'),
                    '--config=configs/gpu.py', '--config.data_source=synthetic'], cwd=ROOT,
                   check=True)


if __name__ == '__main__':
  app.run(main)
