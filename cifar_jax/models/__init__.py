"""CIFAR models in Flax NNX, looked up by name (`config.model`).

Every model maps NHWC images to logits. `dtype` is the compute dtype (bfloat16
for half precision); parameters and BatchNorm statistics stay float32.
Parameters carry logical axis names (`layers`), which `parallel.sharding` maps
to mesh axes. What a model supports is said by its class:

- `takes_widths`: `config.model_widths` sets its block widths (`widths=`);
- `has_blocks`: `config.remat=block` rematerializes each block (`remat=`).

Modules: `layers` (shared building blocks), `convnets` (tutorial CNN, ResNets,
WRN, fast_cnn), `airbench` (airbench94 and its whitening layer), `vit`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import airbench, convnets, vit

# name -> constructor(num_classes, *, dtype, rngs, [widths], [remat]).
MODELS: dict[str, Callable[..., nnx.Module]] = {
    'tutorial_cnn': convnets.TutorialCNN,
    'resnet20': functools.partial(convnets.CifarResNet, 20),
    'resnet56': functools.partial(convnets.CifarResNet, 56),
    'resnet18': convnets.ResNet18,
    'wrn28_10': functools.partial(convnets.WideResNet, 28, 10),
    'fast_cnn': convnets.FastCNN,
    'airbench': airbench.Airbench,
    **{name: functools.partial(vit.ViT, width=w, depth=d, heads=h, mlp=m)
       for name, (w, d, h, m) in vit.VIT_SIZES.items()},
}


def model_class(name: str) -> type:
  """The nnx.Module class registered as `name` (ValueError naming the choices)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  constructor = MODELS[name]
  return constructor.func if isinstance(constructor, functools.partial) else constructor


def takes_widths(name: str) -> bool:
  return model_class(name).takes_widths


def has_blocks(name: str) -> bool:
  return model_class(name).has_blocks


def create_model(name: str, num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 widths: tuple[int, ...] = (), remat: bool = False) -> nnx.Module:
  """Builds the registered model `name` (`widths`: its block widths where it
  `takes_widths`, empty = its own; `remat`: rematerialize each block); raises
  ValueError naming the problem."""
  cls = model_class(name)
  if widths and not cls.takes_widths:
    raise ValueError(f'model {name!r} has fixed widths; widths are for '
                     f'{sorted(n for n in MODELS if takes_widths(n))}')
  if remat and not cls.has_blocks:
    raise ValueError(f'model {name!r} has no blocks to rematerialize')
  kwargs = {'widths': tuple(int(w) for w in widths)} if widths else {}
  if remat:
    kwargs['remat'] = True
  # Logical axis names are metadata here: the shardings are applied by the caller's jit
  # (parallel.sharding), so Flax must not shard each variable as it is created.
  with nnx.use_eager_sharding(False):
    return MODELS[name](num_classes, dtype=dtype, rngs=rngs, **kwargs)


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
