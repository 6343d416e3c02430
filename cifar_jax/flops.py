"""A model's analytic FLOPs per example: its convolutions and matrix products, counted
from their shapes, not from any compiler.

`--mode=compile` reports what XLA's cost analysis says a compiled step costs; this is
the independent check of that number (tests/test_aot.py: the compiled train step's FLOPs
are ~3x the forward pass's per example x batch: the forward, and the backward's two
products per layer, one for the input's gradient and one for the weights'). Only
`conv_general_dilated` and `dot_general` are counted (2 FLOPs per multiply-add; a
convolution's taps that fall on its zero padding are not multiplies):
normalization, activations and the optimizer are a few percent of a CIFAR network's
work, and XLA counts them, which is why the two agree to a few percent, not exactly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax import models
from cifar_jax.data import cifar


def _valid_taps(size: int, out: int, kernel: int, stride: int, low: int, dilation: int,
                lhs_dilation: int) -> int:
  """(output position, kernel tap) pairs along one spatial axis whose input is real, not
  padding: what a convolution multiplies (XLA's cost analysis counts these, too)."""
  dilated = (size - 1) * lhs_dilation + 1
  count = 0
  for o in range(out):
    for k in range(kernel):
      i = o * stride - low + k * dilation
      count += 0 <= i < dilated and i % lhs_dilation == 0
  return count


def _conv_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  spec = eqn.params['dimension_numbers']
  # Specs: (batch/out-feature dim, feature dim, spatial dims...) of lhs, rhs and out.
  taps = 1
  for axis, (lhs_d, rhs_d, out_d) in enumerate(zip(spec.lhs_spec[2:], spec.rhs_spec[2:],
                                                   spec.out_spec[2:])):
    taps *= _valid_taps(lhs.shape[lhs_d], out.shape[out_d], rhs.shape[rhs_d],
                        eqn.params['window_strides'][axis], eqn.params['padding'][axis][0],
                        eqn.params['rhs_dilation'][axis], eqn.params['lhs_dilation'][axis])
  batch = out.shape[spec.out_spec[0]]
  out_features = out.shape[spec.out_spec[1]]
  in_features = rhs.shape[spec.rhs_spec[1]]  # Per group.
  return 2 * batch * out_features * in_features * taps


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of the convolutions and matrix products in `jaxpr`, sub-jaxprs included
  (a jit, a remat, a custom_vjp; a loop's body times its trip count where static)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif eqn.primitive.name == 'dot_general':
      total += _dot_flops(eqn)
    repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += repeat * jaxpr_flops(inner)
  return total


def _model(config):
  num_classes = cifar.NUM_CLASSES[config.dataset]
  model = nnx.eval_shape(lambda: models.create_model(
      config.model, num_classes, rngs=nnx.Rngs(0), widths=tuple(config.model_widths)))
  return nnx.split(model, nnx.Param, ...)


def _example():
  return (jax.ShapeDtypeStruct((1, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE, 3), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.int32))


def forward_flops_per_example(config) -> int:
  """FLOPs of one example's forward pass through `config.model` (eval mode)."""
  graphdef, params, rest = _model(config)

  def forward(params, rest, images):
    module = nnx.merge(graphdef, params, rest)
    module.eval()
    return module(images)

  return jaxpr_flops(jax.make_jaxpr(forward)(params, rest, _example()[0]).jaxpr)


def train_flops_per_example(config) -> int:
  """FLOPs of one example through `step.train_step` of `config` (forward and backward as
  autodiff builds them: the first layer computes no input gradient, a frozen layer no
  weight gradient; EMA, Lookahead and the optimizer are element-wise)."""
  from cifar_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  state = jax.eval_shape(lambda: step_lib.create_train_state(config, jax.random.key(0)))
  images, labels = _example()
  batch = {'image': images, 'label': labels}
  return jaxpr_flops(jax.make_jaxpr(step_lib.train_step)(state, batch).jaxpr)
