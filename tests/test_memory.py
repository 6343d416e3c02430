"""memory.py: a population too big for the device stops before its first step with one
`error:` line naming the largest N that fits, by XLA's memory analysis of the compiled
step. XLA:CPU reports no memory limit, so the tests set one (`device_bytes_limit`)."""
import os
import types

import pytest
from helpers import JAX_CACHE, small_config

from cifar_jax import memory, train
from cifar_jax.errors import UserError


def _config(**overrides):
  return small_config(num_train_steps=2, parallelism='shard_map', input_pipeline='device',
                      report=False, compilation_cache_dir=JAX_CACHE, **overrides)


# --- the search, on a model of the compiled peaks -------------------------------------------
def _search(monkeypatch, peak_of_n, limit, population, data_size=1, layout='replicated'):
  """check_population_fits with compiled peaks `peak_of_n(n)`; returns the error (or None)
  and the sizes it compiled."""
  compiled = []
  def fake_peak(config, backend, state, feed, n):
    compiled.append(n)
    return peak_of_n(n)
  monkeypatch.setattr(memory, 'peak_bytes', fake_peak)
  monkeypatch.setattr(memory, 'device_bytes_limit', lambda: limit)
  config = _config(population=population, population_sharding=layout)
  run_steps = types.SimpleNamespace(
      compile=lambda *args: {'peak_bytes_per_device': peak_of_n(population)})
  backend = types.SimpleNamespace(data_size=data_size, name='jit')
  try:
    memory.check_population_fits(config, backend, run_steps, None, None, None)
  except UserError as e:
    return str(e), compiled
  return None, compiled


@pytest.mark.parametrize('peak_of_n, limit, population, largest', [
    (lambda n: 10 + 7 * n, 60, 8, 7),          # Linear: the first guess fits.
    (lambda n: 10 + 7 * n, 45, 8, 5),
    (lambda n: 10 + n * n, 40, 8, 5),          # Convex: the guess (6) does not; one step down.
    (lambda n: 10 + 7 * n, 16, 8, 0),          # Not even one member.
])
def test_the_error_names_the_largest_population_that_fits(monkeypatch, peak_of_n, limit,
                                                          population, largest):
  message, compiled = _search(monkeypatch, peak_of_n, limit, population)
  assert message.startswith(f'config.population={population} needs ') and '\n' not in message
  if largest:
    assert message.endswith(f'the largest that fits is {largest}: '
                            f'--config.population={largest}')
    assert peak_of_n(largest) <= limit < peak_of_n(largest + 1)
  else:
    assert 'not even the smallest population fits: lower config.batch_size' in message
  assert len(compiled) <= 4  # The smallest, the guess, bisection: not one per size.


def test_members_layout_sizes_are_multiples_of_the_data_axis(monkeypatch):
  message, compiled = _search(monkeypatch, lambda n: 10 * n, 250, 32, data_size=8,
                              layout='members')
  assert message.endswith('--config.population=24') and set(compiled) <= {8, 16, 24}


def test_a_population_that_fits_and_a_solo_run_are_not_stopped(monkeypatch):
  assert _search(monkeypatch, lambda n: 10 * n, 40, 4)[0] is None
  assert _search(monkeypatch, lambda n: 10 * n, 5, 1) == (None, [])


# --- compiled for real ------------------------------------------------------------------------
@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def peaks():
  """Per-device peak bytes of a population of 1, 2 and 3 (a solo run at 1)."""
  config = _config(population=3)
  run = train.setup(config, training=True)
  state = run.backend.put_state(run.state, run.backend.state_layout(run.state))
  return {n: memory.peak_bytes(config, run.backend, state, run.train_feed, n) for n in (1, 2, 3)}


@pytest.mark.e2e
def test_too_big_a_population_stops_before_training_naming_the_largest(peaks, monkeypatch,
                                                                       tmp_path):
  assert 0 < peaks[1] < peaks[2] < peaks[3]
  assert peaks[3] - peaks[2] == pytest.approx(peaks[2] - peaks[1], rel=0.25)  # ~Linear.
  monkeypatch.setattr(memory, 'device_bytes_limit', lambda: (peaks[2] + peaks[3]) // 2)
  with pytest.raises(UserError, match=r'^config.population=3 needs .* more than the device\'s '
                     r'.*; the largest that fits is 2: --config.population=2$'):
    train.train_and_evaluate(_config(population=3), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '2')  # Stopped before training.
