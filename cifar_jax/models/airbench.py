"""airbench94 (Keller Jordan, arXiv:2404.00498): the network and its whitening layer, whose
kernel is fitted to the training images before the first step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax.data import cifar
from cifar_jax.models.layers import batch_norm, conv, head, max_pool_2x2, run_blocks, uniform_fan_in

WHITENING_EXAMPLES = 5000  # A whitening layer is fitted to the first this many train images.


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


def whitening_data(images: np.ndarray, dataset: str) -> np.ndarray:
  """The normalized float64 images a whitening layer is fitted to: the first
  WHITENING_EXAMPLES of the train split, in its stored order (so the fit is a
  function of the data alone: the same on every process, backend and resume)."""
  return cifar.normalize(np.asarray(images[:WHITENING_EXAMPLES]), dataset, np.float64)


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


def _dirac_init(key, shape, dtype=jnp.float32):
  """A 3x3 kernel whose first min(cin, cout) filters pass their input channel through
  (PyTorch's dirac_); the others as `uniform_fan_in`."""
  k = min(shape[2], shape[3])
  kernel = uniform_fan_in(key, shape, dtype).at[:, :, :, :k].set(0.0)
  return kernel.at[shape[0] // 2, shape[1] // 2, jnp.arange(k), jnp.arange(k)].set(1.0)


def _dirac_conv(cin, cout, rngs, dtype):
  return conv(cin, cout, 3, rngs, dtype, kernel_init=_dirac_init)


def _airbench_bn(features, rngs, dtype):
  # No learned scale (PyTorch's weight fixed at 1), eps 1e-12, PyTorch momentum 0.6 (Flax 0.4).
  return batch_norm(features, rngs, dtype, momentum=0.4, epsilon=1e-12, use_scale=False)


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
  takes_widths = True  # `config.model_widths` sets the three blocks' widths.
  has_blocks = True  # `config.remat=block` rematerializes each block.

  def __init__(self, num_classes, widths=(64, 256, 256), *, dtype=jnp.float32, remat=False,
               rngs: nnx.Rngs):
    self.remat = remat
    self.whiten = Whitening(3, 24, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([_AirbenchBlock(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip((24,) + tuple(widths[:-1]), widths)])
    self.head = head(widths[-1], num_classes, rngs, dtype, use_bias=False,
                      kernel_init=uniform_fan_in)

  def __call__(self, x):
    x = nnx.gelu(self.whiten(x), approximate=False)
    x = run_blocks(self.blocks, x, self.remat)
    return self.head(jnp.max(x, axis=(1, 2))) / 9.0


def whitening_layers(model: nnx.Module) -> list[tuple[tuple, Whitening]]:
  """(path, module) of every data-initialized whitening layer in `model`."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Whitening)]
