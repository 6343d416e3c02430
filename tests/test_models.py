import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import models
from cifar_jax.models import airbench, layers


def _abstract_count(name, num_classes=10):
  abstract = nnx.eval_shape(lambda: models.create_model(name, num_classes, rngs=nnx.Rngs(0)))
  return models.param_count(abstract)


@pytest.mark.parametrize('name, expected', [
    ('resnet20', 0.27e6), ('resnet56', 0.85e6), ('resnet18', 11.2e6), ('wrn28_10', 36.5e6)])
def test_parameter_counts_match_the_papers(name, expected):
  assert _abstract_count(name) == pytest.approx(expected, rel=0.01)


def test_tutorial_cnn_has_the_classic_layers():
  # conv 5x5x3x64, conv 5x5x64x64, FC 4096->384, FC 384->192, linear 192->10 (with biases).
  expected = (5*5*3*64 + 64) + (5*5*64*64 + 64) + (4096*384 + 384) + (384*192 + 192) + (192*10 + 10)
  assert _abstract_count('tutorial_cnn') == expected


def test_cifar100_heads_have_100_outputs():
  assert _abstract_count('resnet20', 100) - _abstract_count('resnet20', 10) == 90 * 64 + 90


@pytest.mark.parametrize('name', ['tutorial_cnn', 'resnet20', 'fast_cnn'])
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_forward_gives_logits_and_bf16_keeps_float32_params(name):
  model = models.create_model(name, 10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model.eval()
  logits = model(jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.bfloat16
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  dtypes |= {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))}
  assert dtypes <= {jnp.dtype('float32')}


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match='resnet20'):
    models.create_model('resnet21', 10, rngs=nnx.Rngs(0))


def test_fast_max_pool_equals_max_pool_with_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  ref = lambda x: nnx.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), ref(x))
  g = jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def test_local_response_norm_matches_its_formula():
  x = jax.random.normal(jax.random.key(1), (1, 2, 2, 12))
  y = layers.local_response_norm(x, depth_radius=2, bias=1.0, alpha=0.5, beta=0.75)
  xn = np.asarray(x)
  for c in range(12):
    window = np.sum(xn[..., max(0, c - 2):c + 3] ** 2, axis=-1)
    np.testing.assert_allclose(y[..., c], xn[..., c] / (1.0 + 0.5 * window) ** 0.75, rtol=1e-5)


def test_airbench_has_airbench94s_layers_and_parameter_count():
  # whiten 2x2x3x24 + 24; per block conv a->b, conv b->b (3x3, no bias), 2 BN biases of b;
  # bias-free head 256 -> 10. BatchNorm has no scale.
  blocks = sum(9 * a * b + 9 * b * b + 2 * b for a, b in ((24, 64), (64, 256), (256, 256)))
  assert _abstract_count('airbench') == 2 * 2 * 3 * 24 + 24 + blocks + 256 * 10 == 1_971_640


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_airbench_widths_and_odd_sizes():
  model = models.create_model('airbench', 10, rngs=nnx.Rngs(0), widths=(8, 16, 32))
  model.eval()
  assert model(jnp.ones((2, 32, 32, 3))).shape == (2, 10)  # 31 -> 15 -> 7 -> 3 -> max.
  assert model.head.kernel[...].shape == (32, 10)
  with pytest.raises(ValueError, match='fixed widths'):
    models.create_model('resnet20', 10, rngs=nnx.Rngs(0), widths=(8, 16, 32))


def test_airbench_convs_start_as_identities_on_their_first_channels():
  model = models.create_model('airbench', 10, rngs=nnx.Rngs(0), widths=(32, 64, 64))
  conv = model.blocks[0].conv1  # 24 -> 32: filters 0..23 pass channel i through.
  x = jax.random.normal(jax.random.key(1), (2, 15, 15, 24))
  np.testing.assert_allclose(conv(x)[..., :24], x, atol=1e-6)
  assert float(jnp.abs(conv(x)[..., 24:]).mean()) > 0.01  # The rest random.


def test_whitening_kernel_whitens_the_patches_and_is_deterministic():
  rs = np.random.RandomState(0)
  images = rs.randn(200, 8, 8, 3) @ rs.randn(3, 3) + rs.randn(3)  # Correlated channels.
  kernel = airbench.whitening_kernel(images, eps=0.0)
  assert kernel.shape == (2, 2, 3, 24)
  np.testing.assert_array_equal(kernel, airbench.whitening_kernel(images.copy(), eps=0.0))
  out = jax.lax.conv_general_dilated(jnp.asarray(images, jnp.float32), jnp.asarray(kernel),
                                     (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  flat = np.asarray(out, np.float64).reshape(-1, 24)
  second_moment = flat[:, :12].T @ flat[:, :12] / len(flat)
  np.testing.assert_allclose(second_moment, np.eye(12), atol=1e-3)  # White patches.
  np.testing.assert_allclose(flat[:, 12:], -flat[:, :12], atol=1e-5)  # And their negatives.


@pytest.mark.parametrize('name, expected', [('vit_tiny', 5.4e6), ('vit_small', 21.3e6),
                                            ('vit_giant', 1.84e9)])
def test_vit_sizes(name, expected):
  assert _abstract_count(name) == pytest.approx(expected, rel=0.01)


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_vit_forward_and_no_batchnorm():
  model = models.create_model('vit_micro', 100, rngs=nnx.Rngs(0))
  assert model(jnp.ones((2, 32, 32, 3))).shape == (2, 100)
  assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))


@pytest.mark.parametrize('name', ['fast_cnn', 'vit_micro'])
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_remat_gives_the_same_step_and_checkpoints_every_block(small_config, name):
  # Same numbers, and every block is a checkpoint in the program. (What it saves is the
  # compiler's to decide: test_sharding checks wrn28_10's temporaries halve.)
  from cifar_jax import create_train_state, train_step  # pylint: disable=import-outside-toplevel
  small_config.update(model=name, batch_size=64)
  rs = np.random.RandomState(0)
  batch = {'image': jnp.asarray(rs.randn(64, 32, 32, 3).astype(np.float32)),
           'label': jnp.asarray(rs.randint(0, 10, 64).astype(np.int32))}
  results = {}
  for remat in ('none', 'block'):
    small_config.remat = remat
    state = create_train_state(small_config, jax.random.key(0), 256)
    jaxpr = str(jax.make_jaxpr(train_step)(state, batch))
    new_state, metrics = jax.jit(train_step)(state, batch)
    # The remat primitive prints as remat2 (JAX 0.10) or checkpoint.
    results[remat] = (new_state, metrics, jaxpr.count('remat2[') + jaxpr.count('checkpoint['))
  (plain, plain_metrics, plain_count), (remat, remat_metrics, remat_count) = results.values()
  model = models.create_model(name, 10, rngs=nnx.Rngs(0))
  assert plain_count == 0
  assert remat_count == len(model.blocks)
  assert float(remat_metrics['train_loss']) == pytest.approx(float(plain_metrics['train_loss']),
                                                             rel=1e-5)
  for a, b in zip(jax.tree.leaves(remat.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tutorial_cnn_has_no_blocks_to_remat():
  with pytest.raises(ValueError, match='no blocks'):
    models.create_model('tutorial_cnn', 10, rngs=nnx.Rngs(0), remat=True)
