"""The function every serving path runs: uint8 images -> float32 logits.

`serving_function(model, dataset)`: uint8 [N, 32, 32, 3] -> float32 logits,
normalization inside, the model in eval mode computing in float32 (whatever
`half_precision` trained it), with the EMA weights when the run kept them.
predict, the jax.export artifact and the ONNX model all run it.

Needs only jax, flax and numpy: `onnx_export` imports it in jax2onnx's
environment, which has neither ml_collections nor our Orbax.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cifar_jax import models
from cifar_jax.data import cifar


def float32_model(name: str, num_classes: int, widths, params, batch_stats) -> nnx.Module:
  """Model `name` with these weights in eval mode, computing in float32 (whatever
  `half_precision` trained it: what ONNX runtimes run), without remat."""
  abstract = nnx.eval_shape(lambda: models.create_model(
      name, num_classes, dtype=jnp.float32, rngs=nnx.Rngs(0), widths=tuple(widths)))
  graphdef = nnx.split(abstract, nnx.Param, nnx.BatchStat)[0]
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  model.eval()
  return model


def serving_model(config, state) -> nnx.Module:
  """The run's model (`float32_model`) with its EMA weights when it kept them: what
  predict and both exported formats run."""
  params = state.ema_params if state.ema_params is not None else state.params
  return float32_model(config.model, cifar.NUM_CLASSES[config.dataset],
                       config.model_widths, params, state.batch_stats)


def serving_function(model: nnx.Module, dataset: str):
  """uint8 [N, 32, 32, 3] -> float32 logits [N, classes], normalization inside."""
  def logits(images):
    return model(cifar.normalize(images, dataset)).astype(jnp.float32)

  return logits
