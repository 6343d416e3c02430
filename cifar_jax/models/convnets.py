"""The convolutional networks: the classic tutorial CNN, CIFAR ResNets, ResNet-18, Wide
ResNet 28-10 and fast_cnn (a small airbench-like network for CPUs)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cifar_jax.models.layers import (batch_norm, conv, head, local_response_norm, max_pool_2x2,
                                     run_blocks)


# --- classic tutorial CNN ------------------------------------------------------
class TutorialCNN(nnx.Module):
  """The classic multi-GPU CIFAR-10 tutorial network (conv-pool-norm x2, FC 384, FC 192)."""
  takes_widths = False
  has_blocks = False  # Nothing for `config.remat=block` to wrap.

  def __init__(self, num_classes, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 64, (5, 5), dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(64, 64, (5, 5), dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(8 * 8 * 64, 384, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(384, 192, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(192, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = local_response_norm(nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME'))
    x = local_response_norm(nnx.relu(self.conv2(x)))
    x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    x = x.reshape(-1, self.fc1.in_features)  # (No symbolic batch size in the reshape.)
    x = nnx.relu(self.fc2(nnx.relu(self.fc1(x))))
    return self.head(x)


# --- CIFAR ResNets (He et al. 2016, option A shortcuts) -----------------------
class _TwoConvBlock(nnx.Module):
  """The residual branch of a basic block: conv (with the stride), BN, ReLU, conv, BN."""

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv1 = conv(cin, cout, 3, rngs, dtype, strides=stride)
    self.bn1 = batch_norm(cout, rngs, dtype)
    self.conv2 = conv(cout, cout, 3, rngs, dtype)
    self.bn2 = batch_norm(cout, rngs, dtype)

  def branch(self, x):
    return self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))


class _CifarBlock(_TwoConvBlock):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    super().__init__(cin, cout, stride, dtype=dtype, rngs=rngs)
    self.stride, self.pad = stride, cout - cin

  def __call__(self, x):
    y = self.branch(x)
    shortcut = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
    if self.pad:  # Option A: parameter-free identity with zero channel padding.
      shortcut = jnp.pad(shortcut, [(0, 0)] * 3 + [(self.pad // 2, self.pad - self.pad // 2)])
    return nnx.relu(y + shortcut)


def _stages(block, cin: int, widths, per_stage: int, *, dtype, rngs) -> nnx.List:
  """`per_stage` blocks of each width in turn; the first block of every stage but the first
  has stride 2."""
  blocks = []
  for stage, width in enumerate(widths):
    for i in range(per_stage):
      blocks.append(block(cin, width, 2 if stage and i == 0 else 1, dtype=dtype, rngs=rngs))
      cin = width
  return nnx.List(blocks)


class _ResNet(nnx.Module):
  """Conv stem, BatchNorm and ReLU, the blocks (`self.blocks`), global average pool, head."""

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.mean(x, axis=(1, 2)))


class CifarResNet(_ResNet):
  """ResNet-(6n+2) for CIFAR: widths 16/32/64, n basic blocks per stage."""
  takes_widths = False
  has_blocks = True

  def __init__(self, depth, num_classes, *, dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    self.remat = remat
    self.stem = conv(3, 16, 3, rngs, dtype)
    self.bn = batch_norm(16, rngs, dtype)
    self.blocks = _stages(_CifarBlock, 16, (16, 32, 64), (depth - 2) // 6, dtype=dtype, rngs=rngs)
    self.head = head(64, num_classes, rngs, dtype)


# --- ResNet-18, CIFAR variant (3x3 stem, no stem pooling) ----------------------
class _BasicBlock(_TwoConvBlock):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    super().__init__(cin, cout, stride, dtype=dtype, rngs=rngs)
    needs_proj = stride != 1 or cin != cout
    self.proj = nnx.data(conv(cin, cout, 1, rngs, dtype) if needs_proj else None)
    self.stride = stride
    self.proj_bn = nnx.data(batch_norm(cout, rngs, dtype) if needs_proj else None)

  def __call__(self, x):
    y = self.branch(x)
    # The strided 1x1 projection as a subsample, then a 1x1 convolution: the same numbers, and
    # an ONNX graph that loads (jax2onnx 0.17.1's strided one failed shape inference here).
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x[:, ::self.stride, ::self.stride]))
    return nnx.relu(y + shortcut)


class ResNet18(_ResNet):
  """ResNet-18 with a 3x3 stem and no stem pooling (the usual CIFAR variant)."""
  takes_widths = False
  has_blocks = True

  def __init__(self, num_classes, *, dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    self.remat = remat
    self.stem = conv(3, 64, 3, rngs, dtype)
    self.bn = batch_norm(64, rngs, dtype)
    self.blocks = _stages(_BasicBlock, 64, (64, 128, 256, 512), 2, dtype=dtype, rngs=rngs)
    self.head = head(512, num_classes, rngs, dtype)


# --- Wide ResNet 28-10 (Zagoruyko & Komodakis 2016, pre-activation) ------------
class _WideBlock(nnx.Module):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.bn1 = batch_norm(cin, rngs, dtype)
    self.conv1 = conv(cin, cout, 3, rngs, dtype, strides=stride)
    self.bn2 = batch_norm(cout, rngs, dtype)
    self.conv2 = conv(cout, cout, 3, rngs, dtype)
    needs_proj = stride != 1 or cin != cout
    self.proj = nnx.data(conv(cin, cout, 1, rngs, dtype, strides=stride) if needs_proj else None)

  def __call__(self, x):
    y = nnx.relu(self.bn1(x))
    shortcut = x if self.proj is None else self.proj(y)
    y = self.conv1(y)
    y = self.conv2(nnx.relu(self.bn2(y)))
    return y + shortcut


class WideResNet(nnx.Module):
  """WRN-depth-widen, pre-activation (Zagoruyko & Komodakis 2016)."""
  takes_widths = False
  has_blocks = True

  def __init__(self, depth, widen, num_classes, *, dtype=jnp.float32, remat=False,
               rngs: nnx.Rngs):
    self.remat = remat
    self.stem = conv(3, 16, 3, rngs, dtype)
    self.blocks = _stages(_WideBlock, 16, (16 * widen, 32 * widen, 64 * widen), (depth - 4) // 6,
                          dtype=dtype, rngs=rngs)
    self.bn = batch_norm(64 * widen, rngs, dtype)
    self.head = head(64 * widen, num_classes, rngs, dtype)

  def __call__(self, x):
    x = run_blocks(self.blocks, self.stem(x), self.remat)
    x = nnx.relu(self.bn(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


# --- fast_cnn: a small airbench-style network sized for CPUs --------------------
class _FastBlock(nnx.Module):

  def __init__(self, cin, cout, *, dtype, rngs):
    self.conv1 = conv(cin, cout, 3, rngs, dtype)
    self.bn1 = batch_norm(cout, rngs, dtype)
    self.conv2 = conv(cout, cout, 3, rngs, dtype)
    self.bn2 = batch_norm(cout, rngs, dtype)

  def __call__(self, x):
    x = nnx.gelu(self.bn1(max_pool_2x2(self.conv1(x))))
    return nnx.gelu(self.bn2(self.conv2(x)))


class FastCNN(nnx.Module):
  """Conv stem, then three (conv, pool, BN, GELU, conv, BN, GELU) blocks, global max pool.

  airbench's layout at an eighth to a quarter of its widths (0.3M params,
  ~24M multiply-adds per image): the most accuracy per FLOP we found for short
  CPU runs (XLA's CPU convolutions train at only ~300 images/s on 2 cores).
  """
  takes_widths = True  # `config.model_widths` sets the three blocks' widths.
  has_blocks = True

  def __init__(self, num_classes, stem=24, widths=(32, 64, 128), *, dtype=jnp.float32,
               remat=False, rngs: nnx.Rngs):
    self.remat = remat
    self.stem = conv(3, stem, 3, rngs, dtype)
    self.bn = batch_norm(stem, rngs, dtype)
    self.blocks = nnx.List([_FastBlock(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip((stem,) + tuple(widths[:-1]), widths)])
    self.head = head(widths[-1], num_classes, rngs, dtype, use_bias=False)

  def __call__(self, x):
    x = nnx.gelu(self.bn(self.stem(x)))
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.max(x, axis=(1, 2)))
