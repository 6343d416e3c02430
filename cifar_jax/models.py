"""CIFAR models in Flax NNX, looked up by name.

Every model maps NHWC images to logits. The convolutional ones use BatchNorm
(except the classic tutorial network, which uses local response normalization
as the original did); the vision transformers (`vit_*`) use LayerNorm.
`dtype` is the compute dtype (bfloat16 for half precision); parameters and
BatchNorm statistics always stay float32.

Parameters carry logical axis names (`nnx.with_partitioning`): `channels`
(a convolution's output channels, and the norms and biases over them),
`channels_in`, `embed`, `heads`, `mlp`, `classes`. `parallel.sharding` maps
them to mesh axes for tensor parallelism. `remat=True` rematerializes each
residual/transformer block (`nnx.remat`): the backward pass recomputes a
block's activations instead of keeping them, the same numbers for less memory.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_he_normal = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _named(init, *names):
  """`init` with the logical axis names of the parameter it makes (see module docstring)."""
  return nnx.with_partitioning(init, names)


_CONV_KERNEL = (None, None, 'channels_in', 'channels')


def _conv(cin, cout, k, rngs, dtype, strides=1, use_bias=False, kernel_init=_he_normal):
  return nnx.Conv(cin, cout, (k, k), strides=strides, padding='SAME', use_bias=use_bias,
                  kernel_init=_named(kernel_init, *_CONV_KERNEL),
                  bias_init=_named(nnx.initializers.zeros_init(), 'channels'), dtype=dtype,
                  rngs=rngs)


def _head(features, num_classes, rngs, dtype, use_bias=True,
          kernel_init=nnx.initializers.lecun_normal()):
  return nnx.Linear(features, num_classes, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=_named(kernel_init, 'channels', 'classes'),
                    bias_init=_named(nnx.initializers.zeros_init(), 'classes'))


def _bn(features, rngs, dtype, momentum=0.9, epsilon=1e-5, use_scale=True):
  # Statistics are reduced across devices when the train step sets `axis_name`. The
  # two-pass variance E[(x - mean)^2] (not E[x^2] - mean^2, which cancels badly when
  # |mean| >> std) keeps backends and process counts within float noise of each other.
  return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                       use_fast_variance=False, use_scale=use_scale,
                       scale_init=_named(nnx.initializers.ones_init(), 'channels'),
                       bias_init=_named(nnx.initializers.zeros_init(), 'channels'), rngs=rngs)


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


# --- classic tutorial CNN ------------------------------------------------------
class TutorialCNN(nnx.Module):
  """The classic multi-GPU CIFAR-10 tutorial network (conv-pool-norm x2, FC 384, FC 192)."""

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
class _CifarBlock(nnx.Module):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv1 = _conv(cin, cout, 3, rngs, dtype, strides=stride)
    self.bn1 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.bn2 = _bn(cout, rngs, dtype)
    self.stride, self.pad = stride, cout - cin

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
    if self.pad:  # Option A: parameter-free identity with zero channel padding.
      shortcut = jnp.pad(shortcut, [(0, 0)] * 3 + [(self.pad // 2, self.pad - self.pad // 2)])
    return nnx.relu(y + shortcut)


class CifarResNet(nnx.Module):
  """ResNet-(6n+2) for CIFAR: widths 16/32/64, n basic blocks per stage."""

  def __init__(self, depth, num_classes, *, dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    self.remat = remat
    n = (depth - 2) // 6
    self.stem = _conv(3, 16, 3, rngs, dtype)
    self.bn = _bn(16, rngs, dtype)
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(_CifarBlock(cin, width, 2 if stage and i == 0 else 1, dtype=dtype, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.head = _head(64, num_classes, rngs, dtype)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.mean(x, axis=(1, 2)))


# --- ResNet-18, CIFAR variant (3x3 stem, no stem pooling) ----------------------
class _BasicBlock(nnx.Module):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv1 = _conv(cin, cout, 3, rngs, dtype, strides=stride)
    self.bn1 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.bn2 = _bn(cout, rngs, dtype)
    needs_proj = stride != 1 or cin != cout
    self.proj = nnx.data(_conv(cin, cout, 1, rngs, dtype) if needs_proj else None)
    self.stride = stride
    self.proj_bn = nnx.data(_bn(cout, rngs, dtype) if needs_proj else None)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    # The strided 1x1 projection as a subsample, then a 1x1 convolution: the same numbers, and
    # an ONNX graph that loads (jax2onnx 0.17.1's strided one failed shape inference here).
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x[:, ::self.stride, ::self.stride]))
    return nnx.relu(y + shortcut)


class ResNet18(nnx.Module):

  def __init__(self, num_classes, *, dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    self.remat = remat
    self.stem = _conv(3, 64, 3, rngs, dtype)
    self.bn = _bn(64, rngs, dtype)
    blocks, cin = [], 64
    for stage, width in enumerate((64, 128, 256, 512)):
      for i in range(2):
        blocks.append(_BasicBlock(cin, width, 2 if stage and i == 0 else 1, dtype=dtype, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.head = _head(512, num_classes, rngs, dtype)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.mean(x, axis=(1, 2)))


# --- Wide ResNet 28-10 (Zagoruyko & Komodakis 2016, pre-activation) ------------
class _WideBlock(nnx.Module):

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.bn1 = _bn(cin, rngs, dtype)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype, strides=stride)
    self.bn2 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    needs_proj = stride != 1 or cin != cout
    self.proj = nnx.data(_conv(cin, cout, 1, rngs, dtype, strides=stride) if needs_proj else None)

  def __call__(self, x):
    y = nnx.relu(self.bn1(x))
    shortcut = x if self.proj is None else self.proj(y)
    y = self.conv1(y)
    y = self.conv2(nnx.relu(self.bn2(y)))
    return y + shortcut


class WideResNet(nnx.Module):

  def __init__(self, depth, widen, num_classes, *, dtype=jnp.float32, remat=False,
               rngs: nnx.Rngs):
    self.remat = remat
    n = (depth - 4) // 6
    self.stem = _conv(3, 16, 3, rngs, dtype)
    blocks, cin = [], 16
    for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
      for i in range(n):
        blocks.append(_WideBlock(cin, width, 2 if stage and i == 0 else 1, dtype=dtype, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.bn = _bn(cin, rngs, dtype)
    self.head = _head(cin, num_classes, rngs, dtype)

  def __call__(self, x):
    x = run_blocks(self.blocks, self.stem(x), self.remat)
    x = nnx.relu(self.bn(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


# --- fast_cnn: a small airbench-style network sized for CPUs --------------------
class _FastBlock(nnx.Module):

  def __init__(self, cin, cout, *, dtype, rngs):
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.bn1 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.bn2 = _bn(cout, rngs, dtype)

  def __call__(self, x):
    x = nnx.gelu(self.bn1(max_pool_2x2(self.conv1(x))))
    return nnx.gelu(self.bn2(self.conv2(x)))


class FastCNN(nnx.Module):
  """Conv stem, then three (conv, pool, BN, GELU, conv, BN, GELU) blocks, global max pool.

  airbench's layout at an eighth to a quarter of its widths (0.3M params,
  ~24M multiply-adds per image): the most accuracy per FLOP we found for short
  CPU runs (XLA's CPU convolutions train at only ~300 images/s on 2 cores).
  """

  def __init__(self, num_classes, stem=24, widths=(32, 64, 128), *, dtype=jnp.float32,
               remat=False, rngs: nnx.Rngs):
    self.remat = remat
    self.stem = _conv(3, stem, 3, rngs, dtype)
    self.bn = _bn(stem, rngs, dtype)
    self.blocks = nnx.List([_FastBlock(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip((stem,) + tuple(widths[:-1]), widths)])
    self.head = _head(widths[-1], num_classes, rngs, dtype, use_bias=False)

  def __call__(self, x):
    x = nnx.gelu(self.bn(self.stem(x)))
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.max(x, axis=(1, 2)))


# --- airbench: Keller Jordan's airbench94 network (arXiv:2404.00498) ---------------
class Whitening(nnx.Module):
  """A 2x2 VALID convolution whose kernel whitens the images' 2x2 patches.

  Its 24 filters are the 12 eigenvectors of the training patches' (uncentred)
  covariance, each divided by sqrt(eigenvalue + eps), and their negatives
  (`whitening_kernel`). The kernel is set from data by `create_train_state` and
  never trained (`optimizers.param_labels` labels it 'frozen'); the bias is
  trained only for the first `config.whiten_bias_epochs` ('whiten_bias').
  """

  def __init__(self, cin, cout, *, dtype, rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (2, 2, cin, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,)))
    self.dtype = dtype

  def __call__(self, x):
    # stop_gradient: the kernel is never trained, so its gradient is not even computed.
    kernel = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.bias[...].astype(self.dtype)


def whitening_kernel(images: np.ndarray, eps: float = 5e-4) -> np.ndarray:
  """The Whitening kernel [2, 2, C, 4C] for normalized float images [N, H, W, C].

  Computed in float64 on the host, so it is the same on every process and
  backend; each eigenvector's sign is fixed (largest component positive),
  since an eigen-solver may return either.
  """
  x = np.asarray(images, np.float64)
  n, h, w, c = x.shape
  patches = np.stack([x[:, i:h - 1 + i, j:w - 1 + j] for i in (0, 1) for j in (0, 1)], axis=-2)
  patches = patches.reshape(-1, 4 * c)  # (row, col, channel) order = the HWIO kernel's.
  covariance = patches.T @ patches / len(patches)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # Largest first.
  signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(0), np.arange(4 * c)])
  filters = eigenvectors * signs / np.sqrt(eigenvalues + eps)  # [4C, 4C]: one per column.
  return np.concatenate([filters, -filters], axis=1).reshape(2, 2, c, 8 * c).astype(np.float32)


def _uniform_fan_in(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in over
  all but the last (output) axis."""
  bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dirac_init(key, shape, dtype=jnp.float32):
  """A 3x3 kernel whose first min(cin, cout) filters pass their input channel through
  (PyTorch's dirac_); the others as `_uniform_fan_in`."""
  k = min(shape[2], shape[3])
  kernel = _uniform_fan_in(key, shape, dtype).at[:, :, :, :k].set(0.0)
  return kernel.at[shape[0] // 2, shape[1] // 2, jnp.arange(k), jnp.arange(k)].set(1.0)


def _dirac_conv(cin, cout, rngs, dtype):
  return _conv(cin, cout, 3, rngs, dtype, kernel_init=_dirac_init)


def _airbench_bn(features, rngs, dtype):
  # No learned scale (PyTorch's weight fixed at 1), eps 1e-12, PyTorch momentum 0.6 (Flax 0.4).
  return _bn(features, rngs, dtype, momentum=0.4, epsilon=1e-12, use_scale=False)


class _AirbenchBlock(nnx.Module):

  def __init__(self, cin, cout, *, dtype, rngs):
    self.conv1 = _dirac_conv(cin, cout, rngs, dtype)
    self.norm1 = _airbench_bn(cout, rngs, dtype)
    self.conv2 = _dirac_conv(cout, cout, rngs, dtype)
    self.norm2 = _airbench_bn(cout, rngs, dtype)

  def __call__(self, x):
    x = nnx.gelu(self.norm1(max_pool_2x2(self.conv1(x))), approximate=False)
    return nnx.gelu(self.norm2(self.conv2(x)), approximate=False)


class Airbench(nnx.Module):
  """airbench94: whitening 2x2 conv (24 channels) + GELU, three (conv, pool, BN, GELU,
  conv, BN, GELU) blocks of `widths` (64/256/256), 3x3 max-pool, bias-free head x 1/9.

  BatchNorm has no scale; half of each conv's filters start as identities. The
  whitening kernel comes from the data (`whitening_kernel`). `widths` is
  `config.model_widths`, so a CPU-sized variant is this same code.
  """

  def __init__(self, num_classes, widths=(64, 256, 256), *, dtype=jnp.float32, remat=False,
               rngs: nnx.Rngs):
    self.remat = remat
    self.whiten = Whitening(3, 24, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([_AirbenchBlock(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip((24,) + tuple(widths[:-1]), widths)])
    self.head = _head(widths[-1], num_classes, rngs, dtype, use_bias=False,
                      kernel_init=_uniform_fan_in)

  def __call__(self, x):
    x = nnx.gelu(self.whiten(x), approximate=False)
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.max(x, axis=(1, 2))) / 9.0


# --- Vision transformers for CIFAR (Dosovitskiy et al. 2021, patch 4) --------------
_VIT_INIT = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()


def _dense(cin, cout, names, rngs, dtype):
  return nnx.Linear(cin, cout, dtype=dtype, rngs=rngs, kernel_init=_named(_VIT_INIT, *names),
                    bias_init=_named(_ZEROS, names[-1]))


def _layer_norm(features, rngs, dtype):
  return nnx.LayerNorm(features, epsilon=1e-6, dtype=dtype, rngs=rngs,
                       scale_init=_named(nnx.initializers.ones_init(), 'embed'),
                       bias_init=_named(_ZEROS, 'embed'))


class _SelfAttention(nnx.Module):
  """Multi-head self-attention. Queries, keys and values are column-parallel
  (`embed -> heads`), the output projection row-parallel (`heads -> embed`): under
  tensor parallelism each device computes its heads, and one all-reduce joins them."""

  def __init__(self, width, heads, *, dtype, rngs):
    self.heads = heads
    self.query = _dense(width, width, ('embed', 'heads'), rngs, dtype)
    self.key = _dense(width, width, ('embed', 'heads'), rngs, dtype)
    self.value = _dense(width, width, ('embed', 'heads'), rngs, dtype)
    self.out = _dense(width, width, ('heads', 'embed'), rngs, dtype)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(d // self.heads)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, t, d))


class _TransformerBlock(nnx.Module):
  """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU MLP of `mlp` units."""

  def __init__(self, width, heads, mlp, *, dtype, rngs):
    self.norm1 = _layer_norm(width, rngs, dtype)
    self.attention = _SelfAttention(width, heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(width, rngs, dtype)
    self.mlp_in = _dense(width, mlp, ('embed', 'mlp'), rngs, dtype)
    self.mlp_out = _dense(mlp, width, ('mlp', 'embed'), rngs, dtype)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
  """A vision transformer on 4x4 patches (64 tokens for 32x32 images), learned position
  embeddings, `depth` pre-norm blocks, a final LayerNorm and global average pooling
  (no class token). No BatchNorm: its gradient does not depend on how a batch is split."""

  def __init__(self, num_classes, width, depth, heads, mlp=None, patch=4, image_size=32, *,
               dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'ViT width {width} is not divisible by its {heads} heads')
    self.remat = remat
    self.embed = nnx.Conv(3, width, (patch, patch), strides=patch, padding='VALID', dtype=dtype,
                          rngs=rngs, kernel_init=_named(_VIT_INIT, None, None, None, 'embed'),
                          bias_init=_named(_ZEROS, 'embed'))
    tokens = (image_size // patch) ** 2
    self.position = nnx.Param(_named(nnx.initializers.normal(0.02), None, 'tokens', 'embed')(
        rngs.params(), (1, tokens, width)))
    self.blocks = nnx.List([_TransformerBlock(width, heads, mlp or 4 * width, dtype=dtype,
                                              rngs=rngs) for _ in range(depth)])
    self.norm = _layer_norm(width, rngs, dtype)
    self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs,
                           kernel_init=_named(_ZEROS, 'embed', 'classes'),
                           bias_init=_named(_ZEROS, 'classes'))
    self.dtype = dtype

  def __call__(self, x):
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...].astype(self.dtype)
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.mean(self.norm(x), axis=1))


# name: (width, depth, heads, MLP units). tiny/small/base/large/huge are ViT-Ti/S/B/L/H;
# giant is ViT-G/14's transformer (1.8B parameters), for memory planning; micro is for tests.
VIT_SIZES = {
    'vit_micro': (64, 2, 2, 128),
    'vit_tiny': (192, 12, 3, 768),
    'vit_small': (384, 12, 6, 1536),
    'vit_base': (768, 12, 12, 3072),
    'vit_large': (1024, 24, 16, 4096),
    'vit_huge': (1280, 32, 16, 5120),
    'vit_giant': (1664, 48, 16, 8192),
}


MODELS: dict[str, Callable[..., nnx.Module]] = {
    'tutorial_cnn': TutorialCNN,
    'resnet20': functools.partial(CifarResNet, 20),
    'resnet56': functools.partial(CifarResNet, 56),
    'resnet18': ResNet18,
    'wrn28_10': functools.partial(WideResNet, 28, 10),
    'fast_cnn': FastCNN,
    'airbench': Airbench,
    **{name: functools.partial(ViT, width=w, depth=d, heads=h, mlp=m)
       for name, (w, d, h, m) in VIT_SIZES.items()},
}
WIDTHS_MODELS = ('airbench', 'fast_cnn')  # Models that take `config.model_widths`.
NO_BLOCK_MODELS = ('tutorial_cnn',)  # Models without blocks for `remat` to wrap.


def create_model(name: str, num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 widths: tuple[int, ...] = (), remat: bool = False) -> nnx.Module:
  """Builds the registered model `name` (`widths`: its block widths, for the models in
  WIDTHS_MODELS; empty = the model's own; `remat`: rematerialize each block); raises
  ValueError naming the choices."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  if widths and name not in WIDTHS_MODELS:
    raise ValueError(f'model {name!r} has fixed widths; widths are for {WIDTHS_MODELS}')
  if remat and name in NO_BLOCK_MODELS:
    raise ValueError(f'model {name!r} has no blocks to rematerialize')
  kwargs = {'widths': tuple(int(w) for w in widths)} if widths else {}
  if remat:
    kwargs['remat'] = True
  # Logical axis names are metadata here: the shardings are applied by the caller's jit
  # (parallel.sharding), so Flax must not shard each variable as it is created.
  with nnx.use_eager_sharding(False):
    return MODELS[name](num_classes, dtype=dtype, rngs=rngs, **kwargs)


def whitening_layers(model: nnx.Module) -> list[tuple[tuple, Whitening]]:
  """(path, module) of every data-initialized whitening layer in `model`."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Whitening)]


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
