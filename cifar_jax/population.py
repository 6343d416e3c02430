"""A population: N independent models trained by one compiled step, with ensemble eval.

The train step is pure, so `jax.vmap` over a leading *member* axis of the train state
and of the batch trains N models at once: one compile, one data upload, and on an
accelerator N small networks' kernels fused into kernels N times larger. Member `i` is
the solo run with seed `config.seed + i` (and its values of `config.population_sweep`):
its initialization and exactly the batches (order and augmentation) that solo run sees.
Nothing crosses members: BatchNorm statistics, optimizer state and metrics are per member.

`config.population = N` trains a population with main.py (train.py, dispatch.py and the
backends call the functions here); research code can use them directly (plain pytrees,
like `step`):

    state = population.create_state(config, n=4, num_train_examples=len(labels))
    for s in range(steps):
      batch = population.device_batches(images, labels, s, config, n=4)
      state, metrics = population.train_step(state, batch)   # metrics: [4] each
    sums = population.eval_step(state, eval_batch)          # per member and ensemble

Swept hyper-parameters (`optimizers.SWEEPABLE`) live in the state as arrays
(`TrainState.hparams`), not in N compilations. Not `optax.inject_hyperparams`: that keeps
them inside the optimizer state, so a member's optimizer state would no longer be the
solo run's tree, and label smoothing is not the optimizer's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import numpy as np

from cifar_jax import optimizers, step as step_lib
from cifar_jax.data import device_pipeline

SHARDINGS = ('replicated', 'members')  # config.population_sharding.


def parse_sweep(text: str, n: int) -> dict[str, tuple[float, ...]]:
  """`config.population_sweep` as {field: one value per member}: 'field=v1,...,vN' parts
  joined by ';'. Raises ValueError saying what is wrong."""
  sweep = {}
  for part in filter(None, (p.strip() for p in (text or '').split(';'))):
    name, sep, values = part.partition('=')
    name = name.strip()
    if not sep or name not in optimizers.SWEEPABLE:
      raise ValueError(f'{part!r} is not FIELD=V1,...,V{n} with FIELD one of '
                       f'{", ".join(optimizers.SWEEPABLE)}')
    if name in sweep:
      raise ValueError(f'{name} is swept twice')
    try:
      numbers = tuple(float(v) for v in values.split(','))
    except ValueError:
      raise ValueError(f'{name}={values!r} is not a comma-separated list of numbers') from None
    if len(numbers) != n:
      raise ValueError(f'{name} has {len(numbers)} values for a population of {n}; give '
                       'one per member')
    sweep[name] = numbers
  return sweep


def member_config(config, i: int, n: int | None = None):
  """The config of the solo run that member `i` of `n` (default `config.population`) is:
  seed `config.seed + i` and its values of `config.population_sweep`, population 1."""
  member = config.copy_and_resolve_references()
  member.seed = int(config.seed) + i
  n = int(config.get('population', 1)) if n is None else n
  for name, values in parse_sweep(config.get('population_sweep', ''), n).items():
    member[name] = values[i]
  if 'population' in member:
    member.population, member.population_sweep = 1, ''
  return member


def create_state(config, n: int, num_train_examples: int | None = None,
                 train_images=None, layout=None) -> step_lib.TrainState:
  """N members' train states stacked on a leading axis: member i as
  `step.create_train_state(member_config(config, i), ...)` makes it, bit for bit (with the
  swept fields held as arrays, `TrainState.hparams`). The static fields (graph,
  optimizer, schedule) are shared. `layout`: the stacked state's shardings (a function
  of the abstract state, as `Backend.state_layout`)."""
  swept = tuple(parse_sweep(config.get('population_sweep', ''), n)) if n > 1 else ()
  states = [step_lib.create_train_state(member_config(config, i, n) if n > 1 else config,
                                        jax.random.key(int(config.seed) + i),
                                        num_train_examples, train_images, hparams=swept)
            for i in range(n)]
  # Each separately built state has its own (equal, not identical) graph objects; the
  # members take the first's, so that they form one pytree structure.
  treedef = jax.tree.structure(states[0])
  leaves = [jax.tree.leaves(s) for s in states]
  stacked = treedef.unflatten([jnp.stack(xs) for xs in zip(*leaves)])
  del states, leaves
  return stacked if layout is None else jax.device_put(stacked, layout(stacked))


def member(state: step_lib.TrainState, i: int) -> step_lib.TrainState:
  """Member `i` as a solo train state (for eval, predict and export of one member)."""
  return jax.tree.map(lambda x: x[i], state)


def size(state: step_lib.TrainState) -> int:
  return int(state.step.shape[0])


def train_step(state: step_lib.TrainState, batch: dict, axis_name: str | None = None,
               sync_grads: bool = False) -> tuple[step_lib.TrainState, dict]:
  """`step.train_step` for every member at once: `batch` = {'image': [N, B, 32, 32, 3],
  'label': [N, B]}, member i's batch at [i]; the metrics are [N] arrays. `axis_name`,
  `sync_grads`: as `step.train_step`'s (the device axis, not the member axis)."""
  return jax.vmap(lambda s, b: step_lib.train_step(s, b, axis_name, sync_grads))(state, batch)


def device_batches(images: jax.Array, labels: jax.Array, step: jax.Array, config,
                   n: int, positions: jax.Array | None = None, first: jax.Array | int = 0) -> dict:
  """Train batch `step` of every member, made on the device from the whole train split
  (uint8 [M,32,32,3], int32 [M]): member i's is the batch the solo run with seed
  `config.seed + i` gets from `device_pipeline.train_batch` at that step, bit for bit.
  `positions`: the rows of the global batch to make (default: all); `first`: the index
  of the first of the `n` members (a device's share of a population split over devices)."""
  if positions is None:
    positions = jnp.arange(config.batch_size, dtype=jnp.int32)

  def one(seed):
    return device_pipeline.train_batch(
        images, labels, step, positions, seed=seed, batch_size=int(config.batch_size),
        dataset=config.dataset, cutout=int(config.cutout), pad=int(config.crop_padding),
        pad_mode=config.crop_pad_mode, flip=config.flip)

  return jax.vmap(one)(int(config.seed) + first + jnp.arange(n, dtype=jnp.int32))


def eval_step(state: step_lib.TrainState, batch: dict, tta: int = 0,
              axis_name: str | None = None, member_axis: str | None = None) -> dict:
  """Sums over the real (mask=1) examples of `batch`, per member and for the ensemble.

  `members`: `step.eval_step`'s sums for each member ([N] each; `confusion` [N, C, C]).
  `ensemble`: the same sums for the mean of the members' softmax probabilities (its
  `loss_sum` is the cross-entropy of those probabilities). Each member uses its EMA
  weights when kept, as a solo eval does. `axis_name`: as `step.eval_step`'s (the sums
  are then over every device's rows). `member_axis`: the device axis the members are
  split over, if they are (the ensemble then averages over every device's members).
  """
  members = jax.vmap(lambda s: step_lib.eval_step(s, batch, axis_name, tta=tta))(state)

  def probabilities(s):
    model = s.model(use_ema=True)
    model.eval()
    return jax.nn.softmax(step_lib.tta_logits(model, batch['image'], tta), axis=-1)

  if member_axis is None:
    mean = jnp.mean(jax.vmap(probabilities)(state), axis=0)  # [B, C]
  else:
    total = size(state) * jax.lax.axis_size(member_axis)
    mean = jax.lax.psum(jnp.sum(jax.vmap(probabilities)(state), axis=0), member_axis) / total
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
  if axis_name is not None:
    ensemble = jax.lax.psum(ensemble, axis_name)
  return {'members': members, 'ensemble': ensemble}


def zero_sums(n: int, num_classes: int) -> dict:
  """`eval_step`-shaped zeros, to add batches onto."""
  def sums(shape):
    return {k: jnp.zeros(shape + ((num_classes, num_classes) if k == 'confusion' else ()),
                         jnp.float32)
            for k in ('loss_sum', 'correct', 'correct_top5', 'count', 'confusion')}
  return {'members': sums((n,)), 'ensemble': sums(())}


def summarize(sums: dict, top5: bool = False) -> dict:
  """A record from `eval_step`'s sums (added over batches): each metric as the members'
  mean under its solo name (what the best checkpoint, the report and --mode=eval
  compare), its per-member list `<name>_members`, its standard deviation across members
  `<name>_std`, and the ensemble's `ensemble_<name>`; plus `confusion` (the ensemble's,
  popped by the caller)."""
  m = jax.tree.map(np.asarray, jax.device_get(sums['members']))
  e = jax.tree.map(np.asarray, jax.device_get(sums['ensemble']))
  count = float(e['count'])
  names = {'eval_loss': 'loss_sum', 'eval_accuracy': 'correct'}
  if top5:
    names['eval_top5_accuracy'] = 'correct_top5'
  record = {}
  for name, key in names.items():
    values = m[key] / m['count']
    record.update({name: float(values.mean()), f'{name}_members': [float(v) for v in values],
                   f'{name}_std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                   f'ensemble_{name[len("eval_"):]}': float(e[key] / count)})
  record['eval_count'] = count
  record['confusion'] = e['confusion']
  return record


def train_record(means: dict) -> dict:
  """Train metrics averaged over steps, [N] each -> the members' mean under the solo
  name and the per-member list `<name>_members`."""
  record = {}
  for name, values in means.items():
    values = np.asarray(values, np.float64).reshape(-1)
    record[name] = float(values.mean())
    record[f'{name}_members'] = [float(v) for v in values]
  return record
