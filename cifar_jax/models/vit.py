"""Vision transformers for CIFAR (Dosovitskiy et al. 2021) on 4x4 patches.

Parameters carry the logical axis names `embed`, `heads`, `mlp`, `tokens` and
`classes`; attention is column-parallel in, row-parallel out (`parallel.sharding`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax.data.cifar import IMAGE_SIZE
from cifar_jax.models.layers import named, run_blocks

_VIT_INIT = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()


def _dense(cin, cout, names, rngs, dtype):
  return nnx.Linear(cin, cout, dtype=dtype, rngs=rngs, kernel_init=named(_VIT_INIT, *names),
                    bias_init=named(_ZEROS, names[-1]))


def _layer_norm(features, rngs, dtype):
  return nnx.LayerNorm(features, epsilon=1e-6, dtype=dtype, rngs=rngs,
                       scale_init=named(nnx.initializers.ones_init(), 'embed'),
                       bias_init=named(_ZEROS, 'embed'))


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
  takes_widths = False  # Sizes are the registry's (VIT_SIZES).
  has_blocks = True

  def __init__(self, num_classes, width, depth, heads, mlp=None, patch=4, image_size=IMAGE_SIZE, *,
               dtype=jnp.float32, remat=False, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'ViT width {width} is not divisible by its {heads} heads')
    self.remat = remat
    self.embed = nnx.Conv(3, width, (patch, patch), strides=patch, padding='VALID', dtype=dtype,
                          rngs=rngs, kernel_init=named(_VIT_INIT, None, None, None, 'embed'),
                          bias_init=named(_ZEROS, 'embed'))
    tokens = (image_size // patch) ** 2
    self.position = nnx.Param(named(nnx.initializers.normal(0.02), None, 'tokens', 'embed')(
        rngs.params(), (1, tokens, width)))
    self.blocks = nnx.List([_TransformerBlock(width, heads, mlp or 4 * width, dtype=dtype,
                                              rngs=rngs) for _ in range(depth)])
    self.norm = _layer_norm(width, rngs, dtype)
    self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs,
                           kernel_init=named(_ZEROS, 'embed', 'classes'),
                           bias_init=named(_ZEROS, 'classes'))
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
