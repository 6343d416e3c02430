"""Many steps per compiled call: same bits as one step per call, exact boundaries."""
import itertools

import jax
import numpy as np
import pytest

from helpers import small_config

from cifar_jax import create_train_state, dispatch, parallel
from cifar_jax.data.sources import synthetic


@pytest.mark.parametrize('start, total, k, intervals, want', [
    (0, 10, 4, (100,), [1, 4, 4, 1]),
    (0, 12, 16, (5, 8), [1, 4, 3, 2, 2]),   # Stops at 5, 8, 10, 12.
    (7, 12, 1, (5,), [1] * 5),
    (12, 12, 8, (4,), []),
])
def test_schedule_never_crosses_a_boundary(start, total, k, intervals, want):
  assert dispatch.schedule(start, total, k, intervals) == want


@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def setup():
  config = small_config(batch_size=8, num_train_steps=16, learning_rate=0.4, cutout=8,
                        label_smoothing=0.0)
  data = synthetic('cifar10', 'train', num_examples=40)  # 5 steps per epoch.
  return config, data


def _train(backend, config, feed, pipeline, sizes, poison_after=None):
  """`poison_after`: the dispatch after which the parameters become NaN (as the tests'
  fault hook does between dispatches)."""
  run = backend.train_dispatch(pipeline, config)
  state = backend.put_state(create_train_state(config, jax.random.key(0), 128))
  carry = backend.put_state(dispatch.new_carry())
  for index, (n, block) in enumerate(zip(sizes, feed)):
    state, carry = run(state, carry, block, n)
    if index == poison_after:
      state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
  return jax.device_get(backend.get_state(state)), jax.device_get(carry)


def _assert_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_1_and_k_steps_per_call_are_bit_identical_on_one_device(setup):
  config, data = setup
  runs = {}
  for loop in (True, False):  # The GPU/TPU default and the CPU default.
    backend = parallel.create_backend('jit', jax.devices()[:1], loop_dispatch=loop)
    feed = backend.put_data({'images': data.images, 'labels': data.labels})
    # 4 steps, 3 of them in one call: XLA:CPU runs the compiled loop's weight gradients
    # slowly (dispatch.py), so the loop is kept short.
    one = _train(backend, config, [feed] * 4, 'device', [1] * 4)
    many = _train(backend, config, [feed] * 2, 'device', [1, 3])
    assert int(one[0].step) == int(many[0].step) == 4 and one[1]['first_bad'] == -1
    _assert_identical(one, many)  # Params, BN statistics, optimizer state, EMA, metric sums.
    runs[loop] = _train(backend, config, [feed], 'device', [1])
  # The loop body computes what the plain step computes: compared after one step, since XLA
  # compiles a loop body differently (float sums in another order) and 7 steps of BatchNorm
  # at 4 images per step amplify that to ~1% (jaxlib 0.12, XLA's own CPU convolutions).
  for x, y in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


@pytest.mark.tensorflow  # the host pipeline or the tfds source
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_host_blocks_of_16_give_the_step_by_step_result(setup):
  from cifar_jax import train
  config, data = setup
  backend = parallel.create_backend('jit', jax.devices()[:1])
  blocks = lambda sizes, k: [backend.put_batches(b) for b in train._host_blocks(  # pylint: disable=protected-access
      data, config, 0, sizes, k)]
  one = _train(backend, config, blocks([1] * 7, 1), 'host', [1] * 7)
  many = _train(backend, config, blocks([1, 6], 16), 'host', [1, 6])
  _assert_identical(one, many)


@pytest.mark.parametrize('name, loop', [('pmap', False), ('shard_map', True)])
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_the_first_non_finite_step_is_tracked_on_the_device(setup, name, loop):
  config, data = setup
  backend = parallel.create_backend(name, loop_dispatch=loop)
  feed = backend.put_data({'images': data.images, 'labels': data.labels})
  state, carry = _train(backend, config, [feed] * 2, 'device', [5, 3], poison_after=0)
  first_bad = np.asarray(carry['first_bad']).reshape(-1)[0]
  assert first_bad == 6 and int(np.ravel(state.step)[0]) == 8
  assert not np.isfinite(np.asarray(carry['sums']['train_loss']).reshape(-1)[0])


def test_schedule_cuts_dispatches_at_the_profiler_window():
  sizes = dispatch.schedule(0, 40, 16, (20,), boundaries=(5, 9))
  ends = list(itertools.accumulate(sizes))
  assert sizes[0] == 1 and sum(sizes) == 40
  assert {5, 9, 20, 40} <= set(ends)
  assert max(sizes) <= 16
