"""airbench94's own PyTorch `train94` on given pixels, timed by the race's rule (vs_airbench.py).

  pip install airbench==0.1.8      # or pass its source package: --airbench=airbench-0.1.8.tar.gz
  python benchmarks/airbench_reference.py --data=cifar10.npz --runs=5

`--data` is an .npz of uint8 NHWC `train_images`/`test_images` and `train_labels`/
`test_labels` (vs_airbench.py writes it from our CIFAR copy); they become airbench's own
`cifar10/train.pt` and `test.pt`, so both trainers see the very same pixels. Prints one JSON
line per run: `train_seconds` (from a CUDA-synchronized clock around `train94`: the
whitening init and the epochs, with airbench's in-training evaluation off; its test split is
loaded before the clock starts) and `accuracy` (`airbench.evaluate` at TTA level 2, outside
the clock). One untimed warm-up step first (airbench's `warmup94`: cuDNN autotuning).
airbench94 is CUDA-only (fp16, CUDA events): without a CUDA GPU, or without torch, it prints
one `{"skipped": why}` line. Imports only numpy, torch and airbench, so it runs in any
Python that has PyTorch.
"""
import argparse
import contextlib
import json
import os
import sys
import tarfile
import tempfile
import time
import quiet  # benchmarks/quiet.py, beside this script

import numpy as np

CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck']


def write_airbench_data(data: str, directory: str) -> list[str]:
  """airbench's cached dataset files (what its CifarLoader loads) from our arrays."""
  import torch  # pylint: disable=import-outside-toplevel
  arrays = np.load(data)
  os.makedirs(directory, exist_ok=True)
  written = []
  for split in ('train', 'test'):
    path = os.path.join(directory, f'{split}.pt')
    torch.save({'images': torch.tensor(arrays[f'{split}_images']),
                'labels': torch.tensor(arrays[f'{split}_labels'].astype(np.int64)),
                'classes': CLASSES}, path)
    written.append(path)
  return written


def import_airbench(source: str):
  """The installed airbench, or the one in a source package / folder."""
  if source:
    if source.endswith(('.tar.gz', '.tgz')):
      folder = tempfile.mkdtemp(prefix='airbench_src_')
      with tarfile.open(source) as tar:
        tar.extractall(folder, filter='data')
      [source] = [os.path.join(folder, d) for d in os.listdir(folder)]
    sys.path.insert(0, source)
  import airbench  # pylint: disable=import-outside-toplevel,import-error
  from airbench import lib_airbench94, utils  # pylint: disable=import-outside-toplevel,import-error
  return airbench, lib_airbench94, utils


def main():
  quiet.report(sys.stderr)  # Core count and load at start and end.
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', required=True, help='.npz of our train/test pixels and labels.')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--airbench', default='', help='airbench sdist or source folder '
                      '(default: the installed package).')
  parser.add_argument('--workdir', default='', help='Where cifar10/{train,test}.pt go.')
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(json.dumps({'skipped': f'PyTorch is not installed ({e}); airbench94 needs it'}))
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix='airbench_race_')
  written = write_airbench_data(args.data, os.path.join(workdir, 'cifar10'))
  if not torch.cuda.is_available():
    print(json.dumps({'skipped': 'no CUDA GPU (torch.cuda.is_available() is False): airbench94 '
                      'is CUDA-only (fp16, CUDA events)', 'wrote': written,
                      'torch': torch.__version__}))
    return
  _, lib94, utils = import_airbench(args.airbench)
  os.chdir(workdir)  # airbench's train() loads its test split from ./cifar10.
  hyp = lib94.hyp
  train_loader = utils.CifarLoader('cifar10', train=True, batch_size=hyp['opt']['batch_size'],
                                   aug=hyp['aug'], altflip=True)
  test_loader = utils.CifarLoader('cifar10', train=False, batch_size=2000)
  # train() builds a test loader for its verbose evals (off here): hand it the loaded one,
  # so that loading it is not on the clock.
  make_loader = utils.CifarLoader
  utils.CifarLoader = lambda path, train=True, **kw: (make_loader(path, train=train, **kw)
                                                      if train else test_loader)
  print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__}), flush=True)
  with contextlib.redirect_stdout(sys.stderr):  # airbench's own table goes to stderr.
    lib94.train94(train_loader, run=-1)  # warmup94: one step, untimed.
  for run in range(args.runs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = lib94.train94(train_loader, verbose=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    accuracy = utils.evaluate(model, test_loader, tta_level=hyp['net']['tta_level'])
    print(json.dumps({'run': run, 'train_seconds': seconds, 'accuracy': accuracy}), flush=True)


if __name__ == '__main__':
  main()
