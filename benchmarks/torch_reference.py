"""The same fast_cnn or airbench train step in PyTorch, for a side-by-side images/sec.

  pip install torch   # not a dependency of cifar_jax
  python benchmarks/torch_reference.py --model=airbench --widths=64,128,128 --batch_size=512
  python benchmarks/vs_pytorch.py      # ours and this, side by side in one run

Same layers, widths, batch, SGD with Nesterov momentum and weight decay, label
smoothing; float32; one device. Times the bare step (no input pipeline) on a
fixed batch, like throughput.py's "bare step".
"""
import argparse
import json
import sys
import time
import quiet  # benchmarks/quiet.py, beside this script

import torch
from torch import nn


class Block(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, momentum=0.1)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, momentum=0.1)

  def forward(self, x):
    x = nn.functional.gelu(self.bn1(nn.functional.max_pool2d(self.conv1(x), 2)))
    return nn.functional.gelu(self.bn2(self.conv2(x)))


class FastCNN(nn.Module):

  def __init__(self, num_classes=10, stem=24, widths=(32, 64, 128)):
    super().__init__()
    self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
    self.bn = nn.BatchNorm2d(stem)
    self.blocks = nn.Sequential(*[Block(a, b) for a, b in zip((stem,) + widths[:-1], widths)])
    self.head = nn.Linear(widths[-1], num_classes, bias=False)

  def forward(self, x):
    x = self.blocks(nn.functional.gelu(self.bn(self.stem(x))))
    return self.head(torch.amax(x, dim=(2, 3)))


class AirbenchBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.norm1 = nn.BatchNorm2d(cout, momentum=0.6, eps=1e-12)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.norm2 = nn.BatchNorm2d(cout, momentum=0.6, eps=1e-12)
    for norm in (self.norm1, self.norm2):
      norm.weight.requires_grad = False  # No learned scale.

  def forward(self, x):
    x = nn.functional.gelu(self.norm1(nn.functional.max_pool2d(self.conv1(x), 2)))
    return nn.functional.gelu(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
  """airbench94's network (whitening conv frozen, as in airbench)."""

  def __init__(self, num_classes=10, widths=(64, 256, 256)):
    super().__init__()
    self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    self.whiten.weight.requires_grad = False
    self.blocks = nn.Sequential(*[AirbenchBlock(a, b)
                                  for a, b in zip((24,) + widths[:-1], widths)])
    self.head = nn.Linear(widths[-1], num_classes, bias=False)

  def forward(self, x):
    x = self.blocks(nn.functional.gelu(self.whiten(x)))
    return self.head(torch.amax(x, dim=(2, 3))) / 9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='fast_cnn', choices=('fast_cnn', 'airbench'))
  parser.add_argument('--widths', default='', help='e.g. 64,256,256 (empty: the default)')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--json', action='store_true', help='Print one JSON line.')
  args = parser.parse_args()
  quiet.report(sys.stderr if args.json else None)  # Core count and load at start and end.
  kwargs = {'widths': tuple(int(w) for w in args.widths.split(','))} if args.widths else {}
  model = (FastCNN if args.model == 'fast_cnn' else Airbench)(**kwargs)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
  x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch_size,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(3):
    step()
  t = time.perf_counter()
  for _ in range(args.steps):
    step()
  rate = args.steps * args.batch_size / (time.perf_counter() - t)
  if args.json:
    print(json.dumps({'images_per_sec': rate, 'torch': torch.__version__,
                      'threads': torch.get_num_threads()}))
    return
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}'
        f'{", channels_last" if args.channels_last else ""}: {rate:.1f} images/sec (bare step)')


if __name__ == '__main__':
  main()
