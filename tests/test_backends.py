"""pmap = shard_map = jit (8 devices) = jit on 1 device, to float tolerance."""
import jax
import numpy as np
import pytest

from helpers import small_config

from cifar_jax import create_train_state, parallel
from cifar_jax.data.sources import synthetic
from cifar_jax.data.host_pipeline import eval_batches


def _run(backend, config, batches):
  state = backend.put_state(create_train_state(config, jax.random.key(0), 256))
  for batch in backend.prefetch(batches):
    state, metrics = backend.train_step(state, batch)
  sums = backend.to_host(backend.eval_step(state, backend.put_batch(batches[0] | {
      'mask': np.ones(len(batches[0]['label']), np.float32)})))
  return jax.device_get(backend.get_state(state)), backend.to_host(metrics), sums


@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def results():
  config = small_config(num_train_steps=3, learning_rate=0.4, label_smoothing=0.0)
  rs = np.random.RandomState(0)
  batches = [{'image': rs.randn(32, 32, 32, 3).astype(np.float32),
              'label': rs.randint(0, 10, 32).astype(np.int32)} for _ in range(3)]
  out = {'jit_1device': _run(parallel.create_backend('jit', jax.devices()[:1]), config, batches)}
  for name in parallel.BACKENDS:
    out[name] = _run(parallel.create_backend(name), config, batches)
  return out


def test_there_are_8_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize('name', parallel.BACKENDS)
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_backend_gives_the_same_params_and_stats_as_one_device(results, name):
  ref_state, ref_metrics, ref_eval = results['jit_1device']
  state, metrics, sums = results[name]
  assert int(state.step) == 3
  init = create_train_state(_config_like(), jax.random.key(0), 256)
  for field in ('params', 'batch_stats', 'ema_params', 'opt_state'):
    # Compare what training changed: |delta - delta_ref| / |delta_ref| over the whole tree.
    # Float reduction order gives 1e-4..3e-3 (momentum sums raw gradients); a missing
    # gradient or BatchNorm reduction across devices gives ~1.
    start, ref, got = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(getattr(s, field))])
                       for s in (init, ref_state, state))
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref - start)
    assert error < 2e-2, f'{name} {field}: relative difference {error:.2e}'
  for k, v in ref_metrics.items():
    assert metrics[k] == pytest.approx(v, rel=1e-3), k
  for k, v in ref_eval.items():
    assert sums[k] == pytest.approx(v, rel=1e-3), k


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_training_moved_the_params(results):
  # Guards the comparison above against a step that does nothing.
  fresh = create_train_state(_config_like(), jax.random.key(0), 256)
  moved = [not np.allclose(a, b) for a, b in
           zip(jax.tree.leaves(fresh.params), jax.tree.leaves(results['jit_1device'][0].params))]
  assert all(moved)


def _config_like():
  return small_config(num_train_steps=3, learning_rate=0.4, label_smoothing=0.0)


@pytest.mark.parametrize('name', parallel.BACKENDS)
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_exact_eval_count_when_split_is_not_divisible_by_batch(name):
  from cifar_jax import train
  config = _config_like()
  config.eval_batch_size = 50  # Rounded up to 56 for 8 devices.
  data = synthetic('cifar10', 'test', num_examples=0)
  data = type(data)(data.images[:203], data.labels[:203])  # 203 = 3 * 56 + 35.
  backend = parallel.create_backend(name)
  state = create_train_state(config, jax.random.key(0), 256)
  metrics = train.evaluate(backend, backend.put_state(state), data, config)
  assert metrics['eval_count'] == 203
  # The accuracy is over exactly those 203 images: compare with a direct computation.
  model = state.model(use_ema=True)
  model.eval()
  batch = next(eval_batches(data, 'cifar10', 203))
  expected = np.mean(np.argmax(np.asarray(model(batch['image'])), -1) == data.labels)
  assert metrics['eval_accuracy'] == pytest.approx(expected, abs=1e-6)
