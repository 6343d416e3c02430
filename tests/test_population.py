"""population.py: member i of a vmapped population is the solo run with seed + i."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from cifar_jax import population, step as step_lib
from cifar_jax.data import device_pipeline

N = 3


@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def setup():
  config = small_config(seed=5, flip='alternating', cutout=8)
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.randint(0, 256, (256, 32, 32, 3)).astype(np.uint8))
  labels = jnp.asarray(rs.randint(0, 10, 256).astype(np.int32))
  return config, images, labels


def solo_batch(config, images, labels, step, seed):
  return device_pipeline.train_batch(
      images, labels, jnp.int32(step), jnp.arange(config.batch_size, dtype=jnp.int32),
      seed=seed, batch_size=config.batch_size, dataset=config.dataset, cutout=config.cutout,
      pad=config.crop_padding, pad_mode=config.crop_pad_mode, flip=config.flip)


def test_member_i_starts_as_the_solo_run_with_seed_plus_i(setup):
  config, images, _ = setup
  state = population.create_state(config, N, 256)
  assert population.size(state) == N
  for i in range(N):
    solo = step_lib.create_train_state(config, jax.random.key(config.seed + i), 256)
    for a, b in zip(jax.tree.leaves(population.member(state, i)), jax.tree.leaves(solo)):
      np.testing.assert_array_equal(a, b)
  first = jax.tree.leaves(population.member(state, 0).params)
  second = jax.tree.leaves(population.member(state, 1).params)
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))


def test_member_i_sees_exactly_the_batches_of_the_solo_run(setup):
  config, images, labels = setup
  make = jax.jit(lambda s: population.device_batches(images, labels, s, config, N))
  for step in (0, 9):  # (Step 9 is in epoch 1: alternating flips, a new order.)
    batches = make(jnp.int32(step))
    for i in range(N):
      solo = solo_batch(config, images, labels, step, config.seed + i)
      for key in ('image', 'label'):
        np.testing.assert_array_equal(batches[key][i], solo[key])


@pytest.mark.e2e  # Trains N + 1 models; main.py's loop is checked the same way.
def test_population_training_equals_each_solo_run(setup):
  """To float tolerance: vmapped convolutions are lowered differently, and training
  amplifies last-bit differences at its own pace (measured after one step: <= 3e-6 on every
  leaf with jax 0.11.2 and 0.12; a step later a pooling choice can flip and one member's
  gradient moves by 0.1%). So every leaf is compared after the first step, and the losses
  over three steps, which a wrong seed or batch would move by far more."""
  config, images, labels = setup
  config = config.copy_and_resolve_references()
  config.update(cutout=0, learning_rate=0.05)
  steps = 3
  state = population.create_state(config, N, 256)
  step_fn = jax.jit(population.train_step)
  losses, after_first = [], None
  for step in range(steps):
    state, metrics = step_fn(state, population.device_batches(images, labels, step, config, N))
    losses.append(np.asarray(metrics['train_loss']))
    after_first = state if step == 0 else after_first
  assert losses[0].shape == (N,)
  solo_step = jax.jit(step_lib.train_step)
  for i in range(N):
    solo = step_lib.create_train_state(config, jax.random.key(config.seed + i), 256)
    for step in range(steps):
      solo, solo_metrics = solo_step(solo, solo_batch(config, images, labels, step,
                                                      config.seed + i))
      np.testing.assert_allclose(losses[step][i], solo_metrics['train_loss'], rtol=5e-3)
      if step == 0:
        for a, b in zip(jax.tree.leaves(population.member(after_first, i)),
                        jax.tree.leaves(solo)):
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_eval_per_member_and_ensemble_over_exactly_the_real_examples(setup):
  config, images, labels = setup
  state = population.create_state(config, N, 256)
  # 40 examples in a batch of 48: 8 padding rows (mask 0), repeats of the last example.
  batch = device_pipeline.eval_batch(images[:40], labels[:40], jnp.arange(48), config.dataset)
  sums = jax.jit(population.eval_step)(state, batch)
  np.testing.assert_array_equal(sums['members']['count'], [40.0] * N)
  assert float(sums['ensemble']['count']) == 40.0
  assert float(sums['ensemble']['confusion'].sum()) == 40.0
  probabilities = []
  for i in range(N):
    solo = step_lib.eval_step(population.member(state, i), batch)
    np.testing.assert_allclose(sums['members']['correct'][i], solo['correct'])
    model = population.member(state, i).model(use_ema=True)
    model.eval()
    probabilities.append(jax.nn.softmax(model(batch['image'][:40]), -1))
  mean = np.mean(probabilities, axis=0)
  want = np.sum(np.argmax(mean, -1) == np.asarray(labels[:40]))
  assert float(sums['ensemble']['correct']) == want
  summary = population.summarize(sums)
  assert len(summary['eval_accuracy_members']) == N and summary['eval_count'] == 40.0
  np.testing.assert_allclose(summary['eval_accuracy'], np.mean(summary['eval_accuracy_members']))
  np.testing.assert_allclose(summary['eval_accuracy_std'],
                             np.std(summary['eval_accuracy_members'], ddof=1))
  assert summary['ensemble_accuracy'] == want / 40
