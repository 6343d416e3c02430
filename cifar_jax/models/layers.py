"""Building blocks shared by the models: convolutions, BatchNorm and heads that carry
logical axis names, blocks under remat, and two ops faster than their library form on CPU.

Logical axis names (`nnx.with_partitioning`): `channels` (a convolution's output
channels, and the norms and biases over them), `channels_in`, `classes`;
`parallel.sharding` maps them to mesh axes for tensor parallelism.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

he_normal = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def named(init, *names):
  """`init` with the logical axis names of the parameter it makes (see module docstring)."""
  return nnx.with_partitioning(init, names)


CONV_KERNEL = (None, None, 'channels_in', 'channels')


def conv(cin, cout, k, rngs, dtype, strides=1, use_bias=False, kernel_init=he_normal):
  return nnx.Conv(cin, cout, (k, k), strides=strides, padding='SAME', use_bias=use_bias,
                  kernel_init=named(kernel_init, *CONV_KERNEL),
                  bias_init=named(nnx.initializers.zeros_init(), 'channels'), dtype=dtype,
                  rngs=rngs)


def head(features, num_classes, rngs, dtype, use_bias=True,
          kernel_init=nnx.initializers.lecun_normal()):
  return nnx.Linear(features, num_classes, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=named(kernel_init, 'channels', 'classes'),
                    bias_init=named(nnx.initializers.zeros_init(), 'classes'))


def batch_norm(features, rngs, dtype, momentum=0.9, epsilon=1e-5, use_scale=True):
  # Statistics are reduced across devices when the train step sets `axis_name`. The
  # two-pass variance E[(x - mean)^2] (not E[x^2] - mean^2, which cancels badly when
  # |mean| >> std) keeps backends and process counts within float noise of each other.
  return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                       use_fast_variance=False, use_scale=use_scale,
                       scale_init=named(nnx.initializers.ones_init(), 'channels'),
                       bias_init=named(nnx.initializers.zeros_init(), 'channels'), rngs=rngs)


def _call_block(block, x):
  return block(x)


def run_blocks(blocks, x, remat: bool = False):
  """`x` through `blocks` in turn; with `remat`, each block under `nnx.remat`: its
  activations are recomputed in the backward pass instead of stored."""
  call = nnx.remat(_call_block) if remat else _call_block
  for block in blocks:
    x = call(block, x)
  return x


def max_pool_2x2(x):
  """2x2/stride-2 max pooling as elementwise maxima of four strided slices.

  Same values as `nnx.max_pool(x, (2, 2), (2, 2))`, but its gradient avoids
  XLA's select-and-scatter, which is ~5x slower on CPU.
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2  # Odd sizes: floor, as max_pool does.
  x = x[:, :h, :w]
  return jnp.maximum(jnp.maximum(x[:, ::2, ::2], x[:, ::2, 1::2]),
                     jnp.maximum(x[:, 1::2, ::2], x[:, 1::2, 1::2]))


def local_response_norm(x, depth_radius=4, bias=1.0, alpha=0.001 / 9.0,
                        beta=0.75):
  """tf.nn.lrn over the channel axis, as in the classic CIFAR-10 tutorial."""
  sq = jnp.square(x.astype(jnp.float32))
  padded = jnp.pad(sq, [(0, 0)] * 3 + [(depth_radius, depth_radius)])
  channels = x.shape[-1]
  window = sum(padded[..., i:i + channels] for i in range(2 * depth_radius + 1))
  # lax.pow, not jnp.power: the same op, which jax2onnx also converts with a symbolic batch.
  return (x / jax.lax.pow(bias + alpha * window, beta)).astype(x.dtype)


def uniform_fan_in(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in over
  all but the last (output) axis."""
  bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)
