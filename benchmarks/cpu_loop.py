"""XLA:CPU: a convolution's weight gradient inside a `lax.fori_loop` body vs one call per step.

  python benchmarks/cpu_loop.py                      # 3x3 64->64 at batch 16, as jax-ml/jax#12868
  python benchmarks/cpu_loop.py --channels=256 --batch=64

Why `parallel.create_backend(loop_dispatch=None)` runs a dispatch's steps as separate calls on CPU
(and in one compiled loop elsewhere): XLA:CPU has run a convolution's weight gradient tens of
times slower inside a loop body than outside it. Both rows do the same SGD steps on the same
arrays, in one process, one after the other; the ratio says whether the workaround is still
needed on the installed jaxlib.
"""
import argparse
import importlib.metadata
import time
import quiet  # benchmarks/quiet.py, beside this script

import jax
import jax.numpy as jnp
from jax import lax


def sgd_step(w, x):
  def loss(w):
    y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.mean(y * y)
  return w - 1e-3 * jax.grad(loss)(w)


def main():
  quiet.report()  # Core count and load at start and end.
  parser = argparse.ArgumentParser()
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.batch, args.size, args.size, args.channels))
  w = jax.random.normal(kw, (3, 3, args.channels, args.channels)) * 0.05
  per_call = jax.jit(sgd_step)
  looped = jax.jit(lambda w, x, n: lax.fori_loop(0, n, lambda _, w: sgd_step(w, x), w))

  def timed(fn):
    jax.block_until_ready(fn(w))  # Compile.
    start = time.perf_counter()
    out = jax.block_until_ready(fn(w))
    return (time.perf_counter() - start) / args.steps, out

  def calls(w):
    for _ in range(args.steps):
      w = per_call(w, x)
    return w

  call_s, a = timed(calls)
  loop_s, b = timed(lambda w: looped(w, x, args.steps))
  print(f"jaxlib {importlib.metadata.version('jaxlib')}, "
        f'{jax.devices()[0].platform}: 3x3 conv {args.channels}->{args.channels}, batch '
        f'{args.batch}, {args.size}x{args.size}, SGD step on its weight gradient')
  print(f'  one call per step: {1e3 * call_s:8.1f} ms/step')
  print(f'  inside fori_loop:  {1e3 * loop_s:8.1f} ms/step   ({loop_s / call_s:.1f}x; same '
        f'result: {bool(jnp.allclose(a, b, rtol=1e-4, atol=1e-6))})')


if __name__ == '__main__':
  main()
