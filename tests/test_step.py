import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import create_train_state, eval_step, optimizers, train_step


def _batch(n=32, seed=0):
  rs = np.random.RandomState(seed)
  labels = rs.randint(0, 10, n).astype(np.int32)
  images = rs.randn(n, 32, 32, 3).astype(np.float32) + labels[:, None, None, None] * 0.3
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_public_step_is_jittable_as_is_and_learns(small_config):
  state = create_train_state(small_config, jax.random.key(0), num_train_examples=256)
  step = jax.jit(train_step)
  batch = _batch()
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  assert int(state.step) == 6
  assert losses[-1] < losses[0]
  assert set(metrics) >= {'train_loss', 'train_accuracy', 'learning_rate', 'grad_norm'}


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_step_is_pure_its_inputs_untouched_and_nothing_carried_between_calls(small_config):
  state = create_train_state(small_config, jax.random.key(0), 256)
  other = create_train_state(small_config, jax.random.key(1), 256)
  before = [np.array(x) for x in jax.tree.leaves(state)]
  a, metrics_a = jax.jit(train_step)(state, _batch())
  jax.jit(train_step)(other, _batch(seed=1))  # Another state and batch in between.
  b, metrics_b = jax.jit(lambda s, x: train_step(s, x))(state, _batch())  # A second compile.
  eager, _ = train_step(state, _batch())  # No jit at all.
  for x, y in zip(before, jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(x, y)  # The input state is not modified.
  for x, y, z in zip(jax.tree.leaves((a, metrics_a)), jax.tree.leaves((b, metrics_b)),
                     jax.tree.leaves((eager, metrics_a)), strict=True):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-6)
  assert int(a.step) == 1 and any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a.params), jax.tree.leaves(state.params)))


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_batch_stats_and_ema_move(small_config):
  state = create_train_state(small_config, jax.random.key(0), 256)
  new, _ = jax.jit(train_step)(state, _batch())
  moved = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(state.batch_stats, new.batch_stats)
  assert moved(state.ema_params, new.ema_params)
  # Every EMA leaf sits between the old and the new params (first decay: min(0.9, 1/10) = 0.1).
  leaves = [jax.tree.leaves(t) for t in (state.params, new.params, new.ema_params)]
  assert len(leaves[2]) == len(leaves[0]) > 10
  for old_p, new_p, ema in zip(*leaves, strict=True):
    np.testing.assert_allclose(ema, 0.1 * old_p + 0.9 * new_p, rtol=1e-5, atol=1e-6)


def test_ema_off_means_no_ema_params(small_config):
  small_config.ema_decay = 0.0
  assert create_train_state(small_config, jax.random.key(0), 256).ema_params is None


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_weight_decay_skips_biases_and_norm_parameters(small_config):
  small_config.learning_rate = 1.0
  small_config.momentum = 0.0
  small_config.weight_decay = 0.1
  small_config.ema_decay = 0.0
  state = create_train_state(small_config, jax.random.key(0), 256)
  mask = optimizers.decay_mask(state.params)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = state.tx.update(zero, state.opt_state, state.params)
  for m, u, p in zip(jax.tree.leaves(mask), jax.tree.leaves(updates), jax.tree.leaves(state.params)):
    if m:
      assert p.ndim > 1 and not np.allclose(u, 0)
    else:
      assert p.ndim == 1 and np.allclose(u, 0)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_eval_step_counts_only_unmasked_examples(small_config):
  state = create_train_state(small_config, jax.random.key(0), 256)
  batch = _batch(16)
  full = jax.jit(eval_step)(state, batch)
  mask = jnp.asarray([1.0] * 10 + [0.0] * 6)
  part = jax.jit(eval_step)(state, {**batch, 'mask': mask})
  first10 = jax.jit(eval_step)(state, {k: v[:10] for k, v in batch.items()})
  assert float(full['count']) == 16 and float(part['count']) == 10
  for k in ('loss_sum', 'correct', 'correct_top5', 'count'):
    np.testing.assert_allclose(part[k], first10[k], rtol=1e-5)


@pytest.mark.parametrize('schedule', optimizers.SCHEDULES)
def test_learning_rate_scales_with_batch_and_peaks_after_warmup(small_config, schedule):
  small_config.lr_schedule = schedule
  small_config.learning_rate = 0.1
  small_config.batch_size = 512
  small_config.num_train_steps = 100
  small_config.warmup_epochs = 1.0
  fn = optimizers.learning_rate_schedule(small_config, num_train_examples=512 * 10)
  lrs = np.array([fn(s) for s in range(100)])
  assert lrs.max() == pytest.approx(0.2, rel=1e-4)  # 0.1 * 512 / 256.
  assert int(np.argmax(lrs)) == 10  # One epoch of warm-up.
  assert lrs[-1] < 0.05


@pytest.mark.parametrize('optimizer', optimizers.OPTIMIZERS)
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_every_optimizer_trains(small_config, optimizer):
  small_config.optimizer = optimizer
  small_config.learning_rate = 0.01 if optimizer == 'adamw' else 0.2
  state = create_train_state(small_config, jax.random.key(0), 256)
  state, m0 = jax.jit(train_step)(state, _batch())
  for _ in range(4):
    state, m = jax.jit(train_step)(state, _batch())
  assert np.isfinite(float(m['train_loss'])) and float(m['train_loss']) < float(m0['train_loss'])


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_half_precision_keeps_float32_state(small_config):
  small_config.half_precision = True
  state = create_train_state(small_config, jax.random.key(0), 256)
  state, metrics = jax.jit(train_step)(state, _batch())
  leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state, state.ema_params))
  assert {x.dtype for x in leaves if x.ndim} == {jnp.dtype('float32')}
  assert metrics['train_loss'].dtype == jnp.float32


def _airbench_config(small_config, **kw):
  small_config.update(model='airbench', model_widths=(8, 16, 16), ema_decay=0.0, **kw)
  return small_config


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_lookahead_pulls_fast_weights_to_the_slow_ones(small_config):
  config = _airbench_config(small_config, num_train_steps=4, lookahead_every=2,
                            lookahead_decay=0.5, momentum=0.0)
  batch = _batch()
  with_la = create_train_state(config, jax.random.key(0), 256)
  config.lookahead_every = 0
  plain = create_train_state(config, jax.random.key(0), 256)
  step = jax.jit(train_step)
  for _ in range(2):
    plain, _ = step(plain, batch)
  first, _ = step(with_la, batch)  # Step 1: no sync, the same as a plain step.
  np.testing.assert_array_equal(jax.tree.leaves(first.lookahead['params'])[0],
                                jax.tree.leaves(with_la.params)[0])
  second, _ = step(first, batch)  # Step 2 of 4: slow <- d*slow + (1-d)*fast, d = 0.5*(2/4)^3.
  d = 0.5 * (2 / 4) ** 3
  for p0, fast, slow, now in zip(*(jax.tree.leaves(t) for t in (
      with_la.params, plain.params, second.lookahead['params'], second.params))):
    np.testing.assert_allclose(slow, d * p0 + (1 - d) * fast, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(now, slow)  # The fast weights restart from the slow ones.
  third, _ = step(second, batch)
  last, _ = step(third, batch)  # The last step (4): the run ends on the slow weights.
  for slow, now in zip(jax.tree.leaves(last.lookahead), jax.tree.leaves(
      {'params': last.params, 'batch_stats': last.batch_stats})):
    np.testing.assert_array_equal(now, slow)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_tta_levels_average_the_documented_views(small_config):
  state = create_train_state(_airbench_config(small_config), jax.random.key(0), 256)
  model = state.model()
  model.eval()
  x = _batch(4)['image']
  f = lambda v: model(v).astype(jnp.float32)
  from cifar_jax import step as step_lib
  np.testing.assert_allclose(step_lib.tta_logits(model, x, 0), f(x), rtol=1e-6)
  mirror = lambda v: 0.5 * (f(v) + f(v[:, :, ::-1]))
  np.testing.assert_allclose(step_lib.tta_logits(model, x, 1), mirror(x), rtol=1e-5, atol=1e-6)
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  want = 0.5 * mirror(x) + 0.25 * (mirror(padded[:, :32, :32]) + mirror(padded[:, 2:, 2:]))
  np.testing.assert_allclose(step_lib.tta_logits(model, x, 2), want, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_tta_eval_counts_every_example_of_a_split_not_divisible_by_the_batch(small_config):
  from cifar_jax import parallel, train
  from cifar_jax import step as step_lib
  from cifar_jax.data.sources import synthetic
  config = _airbench_config(small_config, eval_batch_size=48)  # 104 = 2 * 48 + 8.
  data = synthetic('cifar10', 'test')
  data = type(data)(data.images[:104], data.labels[:104])
  state = create_train_state(config, jax.random.key(0), 256)
  model = state.model()
  model.eval()
  from cifar_jax.data.cifar import normalize
  logits = step_lib.tta_logits(model, normalize(jnp.asarray(data.images), 'cifar10'), 2)
  correct = int(jnp.sum(jnp.argmax(logits, -1) == data.labels))
  for name in ('jit', 'shard_map'):
    backend = parallel.create_backend(name)
    feed = backend.put_data({'images': data.images, 'labels': data.labels})
    for test_feed in (feed, None):  # Device and host evals.
      got = train.evaluate(backend, backend.put_state(state), data, config, test_feed, tta=2)
      assert got['eval_count'] == 104 and got['eval_tta'] == 2
      assert round(got['eval_accuracy'] * 104) == correct, (name, test_feed is None)


# --- gradient accumulation (micro_batches) ---------------------------------------------


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_micro_batches_equal_one_batch_without_batchnorm(small_config):
  # vit has no BatchNorm: 4 micro-batches of 8 are one batch of 32, to float tolerance.
  small_config.update(model='vit_micro', ema_decay=0.9, label_smoothing=0.1)
  runs = {}
  for m in (1, 4):
    small_config.micro_batches = m
    state = create_train_state(small_config, jax.random.key(0), 256)
    assert state.micro_batches == m
    step = jax.jit(train_step)
    for seed in range(3):
      state, metrics = step(state, _batch(seed=seed))
    runs[m] = state, metrics
  (one, one_metrics), (four, four_metrics) = runs[1], runs[4]
  assert int(four.step) == 3  # One optimizer update per step.
  for field in ('params', 'opt_state', 'ema_params'):
    np.testing.assert_allclose(_flat(getattr(four, field)), _flat(getattr(one, field)),
                               rtol=1e-4, atol=1e-6)
  for k in one_metrics:
    assert float(four_metrics[k]) == pytest.approx(float(one_metrics[k]), rel=1e-4), k
  assert np.abs(_flat(one.params) - _flat(create_train_state(
      small_config, jax.random.key(0), 256).params)).max() > 1e-3  # It trained.


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_micro_batches_use_strided_micro_batch_statistics(small_config):
  # With BatchNorm, micro-batch j is rows j, j+m, ...; the gradient is the mean of the
  # micro-batches' gradients and the running statistics get the mean of their updates.
  small_config.update(momentum=0.0, ema_decay=0.0, weight_decay=0.0, micro_batches=2)
  batch = _batch()
  state = create_train_state(small_config, jax.random.key(0), 256)
  accumulated, _ = jax.jit(train_step)(state, batch)
  small_config.micro_batches = 1
  single = create_train_state(small_config, jax.random.key(0), 256)
  halves = [jax.jit(train_step)(single, {k: v[j::2] for k, v in batch.items()})[0]
            for j in (0, 1)]
  for field in ('params', 'batch_stats'):
    mean = (_flat(getattr(halves[0], field)) + _flat(getattr(halves[1], field))) / 2
    np.testing.assert_allclose(_flat(getattr(accumulated, field)), mean, rtol=1e-4, atol=1e-6)
