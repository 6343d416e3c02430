"""The function every serving path runs: uint8 images -> float32 logits.

`serving_function(model, dataset)`: uint8 [N, 32, 32, 3] -> float32 logits,
normalization inside, the model in eval mode computing in float32 (whatever
`half_precision` trained it), with the EMA weights when the run kept them.
predict, the jax.export artifact and the ONNX model all run it. A population's
ensemble (`serving_models`, `ensemble_function`) gives the log of its members' mean
probabilities: logits whose softmax is exactly that mean.

Needs only jax, flax and numpy: `onnx_export` imports it in jax2onnx's
environment, which has neither ml_collections nor our Orbax.
"""
from __future__ import annotations

import jax
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


def serving_models(config, state) -> list[nnx.Module]:
  """`serving_model` of each member of a population's stacked state."""
  members = int(state.step.shape[0])
  pick = lambda tree, i: None if tree is None else jax.tree.map(lambda x: x[i], tree)
  return [float32_model(config.model, cifar.NUM_CLASSES[config.dataset], config.model_widths,
                        pick(state.ema_params if state.ema_params is not None else state.params,
                             i), pick(state.batch_stats, i)) for i in range(members)]


def ensemble_function(models: list[nnx.Module], dataset: str):
  """uint8 [N, 32, 32, 3] -> log of the mean of the members' softmax [N, classes]."""
  def logits(images):
    x = cifar.normalize(images, dataset)
    probabilities = [jax.nn.softmax(m(x).astype(jnp.float32), axis=-1) for m in models]
    return jnp.log(jnp.mean(jnp.stack(probabilities), axis=0) + 1e-30)

  return logits


def serving_function(model: nnx.Module, dataset: str):
  """uint8 [N, 32, 32, 3] -> float32 logits [N, classes], normalization inside."""
  def logits(images):
    return model(cifar.normalize(images, dataset)).astype(jnp.float32)

  return logits
