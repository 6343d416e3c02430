"""Optimizers: airbench's units and parameter groups, and the classic ones unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cifar_jax import create_train_state, models, optimizers
from configs import default


def _airbench_sgd_reference(params, grads_seq, labels, eta, lam, m, bias_scaler, batch, schedule):
  """airbench's PyTorch optimizer written out in numpy: SGD(nesterov) on the *summed* loss,
  lr = eta / kilostep, weight_decay = wd / lr per group (biases: lr x bias_scaler)."""
  kilostep = 1024 * (1 + 1 / (1 - m))
  lr = eta / kilostep
  wd = lam * batch / kilostep
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq):
    for k in p:
      group_lr = lr * bias_scaler if labels[k] == optimizers.NORM_BIAS else lr
      d = batch * np.asarray(grads[k], np.float64) + wd / group_lr * p[k]  # Summed-loss grad.
      buf[k] = m * buf[k] + d
      p[k] = p[k] - schedule(t) * group_lr * (d + m * buf[k])  # lr(t) = lr * schedule(t).
  return p


def test_per_1024_units_are_airbench_pytorch_sgd_on_a_summed_loss():
  config = default.get_config()
  config.update(lr_units='per_1024_examples', learning_rate=11.5, weight_decay=0.0153,
                momentum=0.85, nesterov=True, weight_decay_scope='all', batch_size=512,
                bn_bias_lr_multiplier=64.0, lr_schedule='triangular', warmup_epochs=1.0,
                lr_end_fraction=0.07, num_epochs=3.0)
  rs = np.random.RandomState(0)
  params = {'kernel': rs.randn(3, 4).astype(np.float32), 'bias': rs.randn(4).astype(np.float32)}
  labels = {'kernel': optimizers.DEFAULT, 'bias': optimizers.NORM_BIAS}
  n = 512 * 4  # 4 steps per epoch: warmup 4 steps, 12 in all.
  schedule = optimizers.learning_rate_schedule(config, n)
  tx = optimizers.create_optimizer(config, schedule, labels, n)
  grads_seq = [{k: rs.randn(*v.shape).astype(np.float32) * 1e-2 for k, v in params.items()}
               for _ in range(6)]
  ours, state = dict(params), tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
  peak = optimizers.peak_learning_rate(config)
  assert peak == pytest.approx(11.5 * 512 / 1024 * 0.15 / 1.15)
  shape = lambda t: float(schedule(t)) / peak  # 0.2 -> 1 -> 0.07 of the peak.
  assert [shape(0), shape(2), shape(4), shape(12)] == pytest.approx([0.2, 0.6, 1.0, 0.07])
  want = _airbench_sgd_reference(params, grads_seq, labels, 11.5, 0.0153, 0.85, 64.0, 512, shape)
  for k in params:
    np.testing.assert_allclose(ours[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_default_fields_build_exactly_the_classic_optimizer(small_config):
  # Without groups the optimizer (and so its checkpointed state) is what it always was.
  state = create_train_state(small_config, jax.random.key(0), 256)
  schedule = optimizers.learning_rate_schedule(small_config, 256)
  classic = optax.chain(optax.add_decayed_weights(small_config.weight_decay,
                                                  mask=optimizers.decay_mask),
                        optax.sgd(schedule, momentum=small_config.momentum, nesterov=True))
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(classic.init(state.params))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
  ours, _ = state.tx.update(grads, state.opt_state, state.params)
  theirs, _ = classic.update(grads, classic.init(state.params), state.params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_airbench_groups_freeze_the_whitening_kernel_and_stop_its_bias():
  config = default.get_config()
  config.update(model='airbench', model_widths=(8, 16, 16), batch_size=32, num_epochs=4.0,
                whiten_bias_epochs=1.0, bn_bias_lr_multiplier=64.0, learning_rate=1.0)
  abstract = nnx.eval_shape(lambda: models.create_model('airbench', 10, rngs=nnx.Rngs(0),
                                                        widths=(8, 16, 16)))
  labels = optimizers.param_labels(abstract, nnx.state(abstract, nnx.Param))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
  assert {k for k, v in flat.items() if v == optimizers.FROZEN} == {"['whiten']['kernel'].value"}
  assert {k for k, v in flat.items() if v == optimizers.WHITEN_BIAS} == {"['whiten']['bias'].value"}
  assert sum(v == optimizers.NORM_BIAS for v in flat.values()) == 6  # Two BatchNorms per block.
  assert optimizers.param_labels(abstract, nnx.state(abstract, nnx.Param), False) is not None
  state = create_train_state(config, jax.random.key(0), 32 * 3)  # 3 steps per epoch.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), state.params)
  params, opt_state, biases = state.params, state.opt_state, []
  for _ in range(5):
    updates, opt_state = state.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params['whiten']['kernel'][...],
                                  state.params['whiten']['kernel'][...])
    biases.append(np.asarray(params['whiten']['bias'][...]))
  # Trained in the first epoch (steps 1-3), then not moved at all.
  assert not np.array_equal(biases[0], biases[1]) and not np.array_equal(biases[1], biases[2])
  np.testing.assert_array_equal(biases[2], biases[3])
  np.testing.assert_array_equal(biases[3], biases[4])


def test_models_without_special_parameters_get_no_groups(small_config):
  abstract = nnx.eval_shape(lambda: models.create_model('resnet20', 10, rngs=nnx.Rngs(0)))
  assert optimizers.param_labels(abstract, nnx.state(abstract, nnx.Param), False) is None
