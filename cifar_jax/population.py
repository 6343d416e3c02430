"""A population: N independent models trained by one compiled step, with ensemble eval.

The train step is pure, so `jax.vmap` over a leading *member* axis of the train state
and of the batch trains N models at once: one compile, one data upload, and on an
accelerator N small networks' kernels fused into kernels N times larger. Member `i` is
the solo run with seed `config.seed + i`: its initialization and, through
`device_batches`, exactly the batches (order and augmentation) that solo run sees. Nothing
crosses members: BatchNorm statistics, optimizer state and metrics are per member.

For research code (the functions take and return plain pytrees, like `step`):

    state = population.create_state(config, n=4, num_train_examples=len(labels))
    for s in range(steps):
      batch = population.device_batches(images, labels, s, config, n=4)
      state, metrics = population.train_step(state, batch)   # metrics: [4] each
    sums = population.eval_step(state, eval_batch)          # per member and ensemble

`benchmarks/population.py` measures the step against N solo steps. (main.py's loop
does not train populations yet: `config.population` is future work.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cifar_jax import step as step_lib
from cifar_jax.data import device_pipeline


def create_state(config, n: int, num_train_examples: int | None = None,
                 train_images=None) -> step_lib.TrainState:
  """N members' train states stacked on a leading axis: member i as
  `step.create_train_state(config, jax.random.key(config.seed + i), ...)` makes it, bit
  for bit. The static fields (graph, optimizer, schedule) are shared."""
  states = [step_lib.create_train_state(config, jax.random.key(config.seed + i),
                                        num_train_examples, train_images)
            for i in range(n)]
  # Each separately built state has its own (equal, not identical) graph objects; the
  # members take the first's, so that they form one pytree structure.
  treedef = jax.tree.structure(states[0])
  leaves = [jax.tree.leaves(s) for s in states]
  return treedef.unflatten([jnp.stack(xs) for xs in zip(*leaves)])


def member(state: step_lib.TrainState, i: int) -> step_lib.TrainState:
  """Member `i` as a solo train state (for eval, predict and export of one member)."""
  return jax.tree.map(lambda x: x[i], state)


def size(state: step_lib.TrainState) -> int:
  return int(state.step.shape[0])


def train_step(state: step_lib.TrainState, batch: dict) -> tuple[step_lib.TrainState, dict]:
  """`step.train_step` for every member at once: `batch` = {'image': [N, B, 32, 32, 3],
  'label': [N, B]}, member i's batch at [i]; the metrics are [N] arrays."""
  return jax.vmap(step_lib.train_step)(state, batch)


def device_batches(images: jax.Array, labels: jax.Array, step: jax.Array, config,
                   n: int) -> dict:
  """Train batch `step` of every member, made on the device from the whole train split
  (uint8 [M,32,32,3], int32 [M]): member i's is the batch the solo run with seed
  `config.seed + i` gets from `device_pipeline.train_batch` at that step, bit for bit."""
  positions = jnp.arange(config.batch_size, dtype=jnp.int32)

  def one(seed):
    return device_pipeline.train_batch(
        images, labels, step, positions, seed=seed, batch_size=int(config.batch_size),
        dataset=config.dataset, cutout=int(config.cutout), pad=int(config.crop_padding),
        pad_mode=config.crop_pad_mode, flip=config.flip)

  return jax.vmap(one)(int(config.seed) + jnp.arange(n, dtype=jnp.int32))


def eval_step(state: step_lib.TrainState, batch: dict, tta: int = 0) -> dict:
  """Sums over the real (mask=1) examples of `batch`, per member and for the ensemble.

  `members`: `step.eval_step`'s sums for each member ([N] each; `confusion` [N, C, C]).
  `ensemble`: the same sums for the mean of the members' softmax probabilities (its
  `loss_sum` is the cross-entropy of those probabilities). Each member uses its EMA
  weights when kept, as a solo eval does.
  """
  members = jax.vmap(lambda s: step_lib.eval_step(s, batch, tta=tta))(state)

  def probabilities(s):
    model = s.model(use_ema=True)
    model.eval()
    return jax.nn.softmax(step_lib.tta_logits(model, batch['image'], tta), axis=-1)

  mean = jnp.mean(jax.vmap(probabilities)(state), axis=0)  # [B, C]
  labels = batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
  predicted = jnp.argmax(mean, -1)
  top5 = jax.lax.top_k(mean, min(5, mean.shape[-1]))[1]
  log_p = jnp.log(jnp.take_along_axis(mean, labels[:, None], axis=-1)[:, 0] + 1e-30)
  num_classes = mean.shape[-1]
  ensemble = {
      'loss_sum': -jnp.sum(log_p * mask),
      'correct': jnp.sum((predicted == labels) * mask),
      'correct_top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
      'confusion': (jax.nn.one_hot(labels, num_classes) * mask[:, None]).T
                   @ jax.nn.one_hot(predicted, num_classes),
  }
  return {'members': members, 'ensemble': ensemble}


def summarize(sums: dict) -> dict:
  """Accuracies and losses from `eval_step`'s sums (added over batches): per member (lists),
  their mean and standard deviation, and the ensemble's."""
  m, e = jax.device_get(sums['members']), jax.device_get(sums['ensemble'])
  accuracy = m['correct'] / m['count']
  loss = m['loss_sum'] / m['count']
  return {'eval_accuracy': [float(a) for a in accuracy],
          'eval_loss': [float(l) for l in loss],
          'eval_accuracy_mean': float(accuracy.mean()),
          'eval_accuracy_std': float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
          'eval_loss_mean': float(loss.mean()),
          'ensemble_accuracy': float(e['correct'] / e['count']),
          'ensemble_loss': float(e['loss_sum'] / e['count']),
          'eval_count': float(e['count'])}

