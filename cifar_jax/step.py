"""The train state and the pure train/eval steps.

Everything here is a pure function over pytrees: no globals, no TensorFlow,
no device placement. `jax.jit(train_step)` runs it on one device; the
`parallel` module wraps the very same function for pmap, shard_map and jit
with shardings. Research code can import these three names and nothing else.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cifar_jax import models, optimizers
from cifar_jax.data import cifar
from cifar_jax.models import airbench


class TrainState(struct.PyTreeNode):
  """Everything the training trajectory depends on, as one pytree.

  Array fields are saved in checkpoints; static fields (the model's graph, the
  optimizer and hyper-parameters) are rebuilt from the config.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when `ema_decay == 0`.
  graphdef: Any = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  learning_rate_fn: Callable[[jax.Array], jax.Array] = struct.field(pytree_node=False)
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)
  ema_decay: float = struct.field(pytree_node=False, default=0.0)
  # Lookahead's slow weights {'params', 'batch_stats'}; None when `lookahead_every == 0`.
  lookahead: Any = None
  lookahead_every: int = struct.field(pytree_node=False, default=0)
  lookahead_decay: float = struct.field(pytree_node=False, default=0.0)
  total_steps: int = struct.field(pytree_node=False, default=0)
  # Gradient accumulation: the batch is split into this many micro-batches (`train_step`).
  micro_batches: int = struct.field(pytree_node=False, default=1)
  # Hyper-parameters held as arrays, so that a population's members can differ in them
  # under one compiled step (`population`): {name: float32 scalar} of some of
  # `optimizers.SWEEPABLE`, or None (then the static fields above hold every value).
  hparams: Any = None
  # hparams -> (tx, learning_rate_fn, label_smoothing) for those values; None with them.
  with_hparams: Callable[[dict], tuple] | None = struct.field(pytree_node=False, default=None)

  def optimizer(self) -> tuple[optax.GradientTransformation, Callable, Any]:
    """(tx, learning-rate schedule, label smoothing) of this state's hyper-parameters."""
    if self.hparams is None:
      return self.tx, self.learning_rate_fn, self.label_smoothing
    return self.with_hparams(self.hparams)

  def model(self, *, use_ema: bool = False) -> nnx.Module:
    params = self.ema_params if use_ema and self.ema_params is not None else self.params
    return nnx.merge(self.graphdef, params, self.batch_stats, copy=True)


def current_step(state_or_step) -> int:
  """The state's step count as an int (a population's members share one: its [N] `step`
  holds N equal values), read from this process's shard where the array spans hosts."""
  step = getattr(state_or_step, 'step', state_or_step)
  if isinstance(step, jax.Array) and not step.is_fully_addressable:
    step = step.addressable_shards[0].data
  return int(np.asarray(step).reshape(-1)[0])


def create_train_state(config, rng: jax.Array, num_train_examples: int | None = None,
                       train_images: np.ndarray | None = None,
                       layout: Callable[[Any], Any] | None = None,
                       hparams: tuple[str, ...] = ()) -> TrainState:
  """Initializes model, optimizer, EMA and Lookahead from `config` and a PRNG key.

  `num_train_examples` sets the epoch length for the LR schedule; it defaults
  to the dataset's official train split size. `train_images` (uint8 [N,32,32,3])
  initialize data-dependent layers (`models.airbench.Whitening`); without them those
  keep their random init, which is fine for a template a checkpoint overwrites.
  `layout` maps the abstract state to its shardings (e.g.
  `parallel.Backend.state_layout`): the state is then created in place,
  sharded, never whole on one device. The values do not depend on the layout
  (JAX's partitionable threefry). `hparams`: the fields of `optimizers.SWEEPABLE` to
  hold as arrays in the state (`TrainState.hparams`; a population sweeps them).
  """
  num_classes = cifar.NUM_CLASSES[config.dataset]
  num_train_examples = num_train_examples or cifar.SPLIT_SIZES['train']
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  schedule = optimizers.learning_rate_schedule(config, num_train_examples)
  widths = tuple(config.model_widths)
  make_model = lambda rng: models.create_model(config.model, num_classes, dtype=dtype,
                                               rngs=nnx.Rngs(rng), widths=widths,
                                               remat=config.remat == 'block')
  abstract = nnx.eval_shape(lambda: make_model(jax.random.key(0)))
  labels = optimizers.param_labels(abstract, nnx.state(abstract, nnx.Param),
                                   config.bn_bias_lr_multiplier != 1.0)
  tx = optimizers.create_optimizer(config, schedule, labels, num_train_examples)
  with_hparams, base_schedule = None, schedule
  if hparams:
    def with_hparams(values):
      member = optimizers.with_values(config, values)
      # Every schedule is linear in the learning rate (optax's cosine tests its peak in
      # Python, which a traced one cannot be): config's, scaled.
      ratio = values['learning_rate'] / config.learning_rate if 'learning_rate' in values else 1.0
      schedule = lambda count: base_schedule(count) * ratio
      return (optimizers.create_optimizer(member, schedule, labels, num_train_examples),
              schedule, member.label_smoothing)
  whitening = None
  if train_images is not None and airbench.whitening_layers(abstract):
    whitening = airbench.whitening_kernel(airbench.whitening_data(train_images, config.dataset))
  lookahead_every = int(config.lookahead_every)

  def init(rng, whitening):
    model = make_model(rng)
    if whitening is not None:
      for _, layer in airbench.whitening_layers(model):
        layer.kernel[...] = whitening
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=copy(params) if config.ema_decay > 0 else None,
        graphdef=graphdef, tx=tx, learning_rate_fn=schedule,
        label_smoothing=float(config.label_smoothing), ema_decay=float(config.ema_decay),
        lookahead=({'params': copy(params), 'batch_stats': copy(batch_stats)}
                   if lookahead_every else None),
        lookahead_every=lookahead_every,
        lookahead_decay=float(config.lookahead_decay),
        total_steps=optimizers.total_steps(config, num_train_examples),
        micro_batches=int(config.micro_batches),
        hparams={k: jnp.float32(config[k]) for k in hparams} if hparams else None,
        with_hparams=with_hparams)

  # One compiled init instead of hundreds of eagerly dispatched ops (seconds on CPU).
  if layout is None:
    return jax.jit(init)(rng, whitening)
  return jax.jit(init, out_shardings=layout(jax.eval_shape(init, rng, whitening)))(rng, whitening)


def _with_axis(model: nnx.Module, axis_name: str | None) -> nnx.Module:
  # Global-batch BatchNorm: statistics are averaged over the device axis.
  if axis_name is not None:
    model.set_attributes(nnx.BatchNorm, axis_name=axis_name, raise_if_not_found=False)
  return model


def _pmean(x, axis_name):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _split_micro_batches(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [m, B/m, ...], micro-batch j = rows j, j+m, j+2m, ... (strided), so that
  every device's rows are split alike and each micro-batch spans all devices."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _join_micro_batches(x: jax.Array) -> jax.Array:
  """The inverse of `_split_micro_batches`."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def train_step(state: TrainState, batch: dict, axis_name: str | None = None,
               sync_grads: bool = False) -> tuple[TrainState, dict]:
  """One SGD step on `batch` = {'image': [B,32,32,3] float, 'label': [B] int}.

  Args:
    axis_name: the device axis when run under pmap or shard_map (None under
      plain jit, where arrays are global). Loss, metrics and BatchNorm
      statistics are then global-batch values.
    sync_grads: pmean the gradients over `axis_name`. Needed under `jax.pmap`
      (and shard_map with check_vma=False), where autodiff leaves per-device
      gradients; under shard_map with check_vma=True the gradient of the
      replicated params is already the global one.
  Returns the new state and global-batch metrics (loss, accuracy, lr, grad norm).

  With `state.micro_batches = m > 1` the batch is split into m strided
  micro-batches (`_split_micro_batches`) and a `lax.scan` accumulates their
  gradients: one optimizer update per step, so the schedule, EMA, step count,
  data position and checkpoints mean what they mean at m = 1, and only one
  micro-batch's activations are alive at a time. The loss and gradient are the
  mean over micro-batches, equal to the whole batch's for equal micro-batches.
  BatchNorm normalizes with each micro-batch's own statistics (global over the
  devices), as a smaller batch would; its running averages get one update per
  step, with the mean of the m micro-batches' statistics:
  r <- momentum * r + (1 - momentum) * mean_j(stats_j).
  """
  m = state.micro_batches
  tx, learning_rate_fn, label_smoothing = state.optimizer()

  def loss_fn(params, images, labels):
    model = _with_axis(nnx.merge(state.graphdef, params, state.batch_stats, copy=True), axis_name)
    model.train()
    logits = model(images).astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = _pmean(optax.softmax_cross_entropy(logits, targets).mean(), axis_name)
    return loss, (logits, nnx.state(model, nnx.BatchStat))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if m == 1:
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, batch['image'], batch['label'])
  else:
    def accumulate(totals, micro_batch):
      (loss, (logits, stats)), grads = grad_fn(state.params, micro_batch['image'],
                                               micro_batch['label'])
      return jax.tree.map(jnp.add, totals, (loss, grads, stats)), logits

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), state.params,
                                          state.batch_stats))
    micro = {k: _split_micro_batches(batch[k], m) for k in ('image', 'label')}
    totals, logits = jax.lax.scan(accumulate, zeros, micro)
    loss, grads, batch_stats = jax.tree.map(lambda t: t / m, totals)
    logits = _join_micro_batches(logits)
  labels = batch['label']
  if sync_grads and axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    # As tf.train.ExponentialMovingAverage(num_updates=step): a short warm-up.
    decay = jnp.minimum(state.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
  lookahead = state.lookahead
  if lookahead is not None:
    params, batch_stats, lookahead = _lookahead(state, params, batch_stats)
  metrics = {
      'train_loss': loss,
      'train_accuracy': _pmean(jnp.mean(jnp.argmax(logits, -1) == labels), axis_name),
      'learning_rate': learning_rate_fn(state.step),
      'grad_norm': optax.tree.norm(grads),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params, lookahead=lookahead)
  return new_state, metrics


def _lookahead(state: TrainState, params, batch_stats):
  """airbench's Lookahead, after step t = state.step + 1 has updated the fast weights.

  Every `lookahead_every` steps the slow weights move towards the fast ones,
  slow <- d*slow + (1-d)*fast with d = lookahead_decay * (t/T)^3 (no averaging
  early, the most at the end), and the fast weights restart from the slow ones.
  After the last step T the fast weights become the slow ones: the model a run
  ends with is the slow one. Unlike the EMA (which only watches), this changes
  the trajectory. BatchNorm statistics are averaged too, as airbench does.
  """
  t = state.step + 1
  fast = {'params': params, 'batch_stats': batch_stats}
  progress = t.astype(jnp.float32) / max(state.total_steps, 1)
  decay = state.lookahead_decay * progress ** 3
  sync = t % state.lookahead_every == 0
  # As a lerp (PyTorch's lerp_, as airbench), s + (1-d)(f - s): a weight that does not move
  # (a frozen one) stays bit-identical, which d*s + (1-d)*f would round away from.
  slow = jax.tree.map(lambda s, f: jnp.where(sync, s + (1.0 - decay) * (f - s), s),
                      state.lookahead, fast)
  fast = jax.tree.map(lambda s, f: jnp.where(sync | (t >= state.total_steps), s, f), slow, fast)
  return fast['params'], fast['batch_stats'], slow


def tta_logits(model: nnx.Module, images: jax.Array, level: int) -> jax.Array:
  """Test-time augmentation, as airbench: 0 none; 1 the mean of the image's and its
  mirror's logits; 2 half that, plus half the mean of the same for the image
  translated by one pixel up-left and down-right (reflection-padded)."""
  def mirror(x):
    if level == 0:
      return model(x).astype(jnp.float32)
    return 0.5 * (model(x).astype(jnp.float32) + model(x[:, :, ::-1]).astype(jnp.float32))

  logits = mirror(images)
  if level >= 2:
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
    h, w = images.shape[1:3]
    shifted = [padded[:, :h, :w], padded[:, 2:, 2:]]
    logits = 0.5 * logits + 0.25 * (mirror(shifted[0]) + mirror(shifted[1]))
  return logits


def eval_step(state: TrainState, batch: dict, axis_name: str | None = None,
              tta: int = 0) -> dict:
  """Sums over the real (mask=1) examples of `batch`; EMA weights when kept;
  `tta`: test-time augmentation level (`tta_logits`).

  Returns sums, not means, so that batches (and devices) add up exactly:
  `loss_sum`, `correct`, `correct_top5`, `count`, and `confusion` [C, C] (rows: true
  class, columns: predicted).
  """
  model = state.model(use_ema=True)
  model.eval()
  logits = tta_logits(model, batch['image'], tta)
  labels = batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  predicted = jnp.argmax(logits, -1)
  sums = {
      'loss_sum': jnp.sum(loss * mask),
      'correct': jnp.sum((predicted == labels) * mask),
      'correct_top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
      'confusion': (jax.nn.one_hot(labels, logits.shape[-1]) * mask[:, None]).T
                   @ jax.nn.one_hot(predicted, logits.shape[-1]),
  }
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)
