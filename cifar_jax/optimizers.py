"""Learning-rate schedules and optimizers from a config, all built from optax.

Two ways to quote SGD's hyper-parameters (`config.lr_units`):

- `batch256` (the classic one): `learning_rate` is the peak LR for a global
  batch of 256, scaled linearly with the batch; `weight_decay` is an L2 term
  added to the gradient: step = lr(t) * nesterov(g + wd * p).
- `per_1024_examples` (airbench's): `learning_rate` (eta) and `weight_decay`
  (lambda) are per 1024 examples and normalized for momentum m, so changing the
  batch or the momentum leaves them meaning the same:
  step = s(t) * B/1024 * (1-m)/(2-m) * nesterov(eta * g + lambda * p),
  with s(t) the schedule's shape (peak 1). This is exactly airbench's PyTorch
  SGD on a summed loss, written for our mean loss.

Parameter groups (`param_labels`) let one model's parameters be treated apart:
BatchNorm biases get `bn_bias_lr_multiplier` (airbench: 64), a data-initialized
whitening kernel is never trained, and its bias only for `whiten_bias_epochs`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cifar_jax.data import cifar
from cifar_jax.models import airbench

SCHEDULES = ('cosine', 'onecycle', 'piecewise', 'triangular')
OPTIMIZERS = ('sgd', 'adamw', 'lars')
LR_UNITS = ('batch256', 'per_1024_examples')
WEIGHT_DECAY_SCOPES = ('kernels', 'all')
BASE_BATCH_SIZE = 256  # `config.learning_rate` is quoted for this global batch (lr_units=batch256).
TRIANGULAR_START = 0.2  # The triangular schedule starts at this fraction of its peak (airbench).
DEFAULT, NORM_BIAS, FROZEN, WHITEN_BIAS = 'default', 'norm_bias', 'frozen', 'whiten_bias'
# The hyper-parameters a population may vary per member (`config.population_sweep`): each is
# read only as a number in the arithmetic below (and the loss), so an array works as well.
SWEEPABLE = ('learning_rate', 'weight_decay', 'label_smoothing')


class with_values:  # pylint: disable=invalid-name  # Used like a function.
  """`config` with some fields replaced by `values` (e.g. traced per-member arrays): what
  the functions here read, attribute or item, without copying the ConfigDict (which would
  type-check an array against a float field)."""

  def __init__(self, config, values: dict):
    self._config, self._values = config, dict(values)

  def __getattr__(self, name):
    values = self.__dict__['_values']
    return values[name] if name in values else getattr(self.__dict__['_config'], name)

  def __getitem__(self, name):
    return self.__getattr__(name)

  def get(self, name, default=None):
    return self._values[name] if name in self._values else self._config.get(name, default)


def total_steps(config, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * cifar.steps_per_epoch(num_train_examples, config.batch_size))


def peak_learning_rate(config) -> float:
  """The schedule's peak: the LR applied to the (mean-loss) gradient at the peak."""
  if config.lr_units == 'per_1024_examples':
    m = config.momentum
    return config.learning_rate * config.batch_size / 1024 * (1 - m) / (2 - m)
  return config.learning_rate * config.batch_size / BASE_BATCH_SIZE


def learning_rate_schedule(config, num_train_examples: int) -> optax.Schedule:
  """Peak LR (`peak_learning_rate`), linear warmup, then the named decay."""
  peak = peak_learning_rate(config)
  total = max(total_steps(config, num_train_examples), 1)
  epoch = cifar.steps_per_epoch(num_train_examples, config.batch_size)
  warmup = min(int(config.warmup_epochs * epoch), total - 1)
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
  if config.lr_schedule in ('onecycle', 'triangular'):
    # Linear up to the peak, linear down: best for short budgets. onecycle (as this project
    # always had) goes 0.1 -> 1 -> 0 of the peak; triangular (airbench) 0.2 -> 1 ->
    # `lr_end_fraction` (airbench94: 0.07, with the peak at 23% of training).
    start, end = (0.1, 0.0) if config.lr_schedule == 'onecycle' else (
        TRIANGULAR_START, config.lr_end_fraction)
    return optax.join_schedules(
        [optax.linear_schedule(peak * start, peak, warmup),
         optax.linear_schedule(peak, peak * end, total - warmup)], [warmup])
  if config.lr_schedule == 'piecewise':
    # The ResNet paper's schedule: /10 at 50% and 75% of training, after warmup.
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         optax.piecewise_constant_schedule(
             peak, {int(total * 0.5) - warmup: 0.1, int(total * 0.75) - warmup: 0.1})],
        [warmup])
  raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}; choose one of {SCHEDULES}')


def decay_mask(params):
  """Weight decay on kernels only: never on biases or normalization parameters."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def param_labels(model: nnx.Module, params, separate_norm_biases: bool = True) -> dict | None:
  """A `params`-shaped tree of group names for `model` (abstract is fine), or None when
  every parameter is in the default group (then the optimizer and its state are
  exactly the ungrouped ones).

  BatchNorm biases are NORM_BIAS (if `separate_norm_biases`); the kernel of a
  `models.airbench.Whitening` layer is FROZEN and its bias WHITEN_BIAS; the rest DEFAULT.
  """
  groups = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm) and separate_norm_biases:
      groups[path + ('bias',)] = NORM_BIAS
    if isinstance(module, airbench.Whitening):
      groups[path + ('kernel',)] = FROZEN
      groups[path + ('bias',)] = WHITEN_BIAS

  def label(path, _):
    keys = tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path)
    return groups.get(tuple(k for k in keys if k != 'value'), DEFAULT)

  labels = jax.tree_util.tree_map_with_path(label, params)
  return labels if any(x != DEFAULT for x in jax.tree.leaves(labels)) else None


def _base_optimizer(config, schedule, lr_multiplier: float = 1.0) -> optax.GradientTransformation:
  scope = config.weight_decay_scope
  mask = decay_mask if scope == 'kernels' else None
  if config.optimizer == 'sgd':
    if config.lr_units == 'per_1024_examples':
      # schedule(t) = s(t) * eta * B/1024 * (1-m)/(2-m), so lambda/eta makes lambda per 1024.
      return optax.chain(
          optax.scale(lr_multiplier),
          optax.add_decayed_weights(config.weight_decay / config.learning_rate, mask=mask),
          optax.trace(config.momentum, nesterov=config.nesterov),
          optax.scale_by_learning_rate(schedule))
    return optax.chain(
        *([optax.scale(lr_multiplier)] if lr_multiplier != 1 else []),
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  lr = schedule if lr_multiplier == 1 else (lambda count: schedule(count) * lr_multiplier)
  if config.optimizer == 'adamw':
    return optax.adamw(lr, weight_decay=config.weight_decay, mask=mask)
  if config.optimizer == 'lars':
    return optax.lars(lr, weight_decay=config.weight_decay, weight_decay_mask=mask or True,
                      trust_ratio_mask=decay_mask, momentum=config.momentum,
                      nesterov=config.nesterov)
  raise ValueError(f'unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}')


def create_optimizer(config, schedule: optax.Schedule, labels=None,
                     num_train_examples: int | None = None) -> optax.GradientTransformation:
  """The configured optimizer; with `labels` (from `param_labels`), one per group."""
  if labels is None:
    return _base_optimizer(config, schedule)
  num_train_examples = num_train_examples or cifar.SPLIT_SIZES['train']
  whiten_bias_steps = int(config.whiten_bias_epochs *
                          cifar.steps_per_epoch(num_train_examples, config.batch_size))
  transforms = {
      DEFAULT: _base_optimizer(config, schedule),
      NORM_BIAS: _base_optimizer(config, schedule, config.bn_bias_lr_multiplier),
      FROZEN: optax.set_to_zero(),
      # Trained for the first epochs only; after that not moved at all (momentum included).
      WHITEN_BIAS: optax.chain(_base_optimizer(config, schedule), optax.scale_by_schedule(
          lambda count: (count < whiten_bias_steps).astype(jnp.float32))),
  }
  used = set(jax.tree.leaves(labels))
  return optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
