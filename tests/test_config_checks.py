import pytest

from cifar_jax import config_checks
from cifar_jax.errors import UserError


@pytest.fixture
def small_config(small_config):
  """Validation alone needs no TensorFlow: the device pipeline (the host pipeline's
  TensorFlow check is tested end to end in test_main.py)."""
  small_config.input_pipeline = 'device'
  return small_config


@pytest.mark.parametrize('field, value, message', [
    ('model', 'resnet21', r'config.model=.resnet21. is unknown.*resnet20'),
    ('dataset', 'mnist', r'config.dataset=.mnist. is unknown.*cifar10'),
    ('data_source', 'web', r'config.data_source=.web. is unknown.*archive'),
    ('parallelism', 'pjit', r'config.parallelism=.pjit. is unknown.*shard_map'),
    ('optimizer', 'adam', r'config.optimizer=.adam. is unknown.*adamw'),
    ('lr_schedule', 'linear', r'config.lr_schedule=.linear. is unknown'),
    ('batch_size', 100, r'config.batch_size=100 is not divisible by the 8 devices.*batch_size=96'),
    ('batch_size', 0, r'config.batch_size=0 must be a number > 0'),
    ('ema_decay', 1.0, r'config.ema_decay=1.0 must be in \[0, 1\)'),
    ('learning_rate', -0.1, r'config.learning_rate=-0.1 must be'),
    ('input_pipeline', 'gpu', r'config.input_pipeline=.gpu. is unknown.*device'),
    ('steps_per_dispatch', 0, r'config.steps_per_dispatch=0 must be a number > 0'),
    ('tta', 3, r'config.tta=3 is unknown; use one of: 0, 1, 2'),
    ('flip', 'always', r'config.flip=.always. is unknown.*alternating'),
    ('crop_pad_mode', 'edge', r'config.crop_pad_mode=.edge. is unknown.*reflect'),
    ('crop_padding', 40, r'config.crop_padding=40 must be an integer in 0..31'),
    ('lr_units', 'per_example', r'config.lr_units=.per_example. is unknown.*per_1024_examples'),
    ('weight_decay_scope', 'biases', r'config.weight_decay_scope=.biases. is unknown.*all'),
    ('model_widths', (32, 0), r'config.model_widths=\(32, 0\) must be positive integers'),
    ('lookahead_decay', 1.0, r'config.lookahead_decay=1.0 must be in \[0, 1\)'),
    ('bn_bias_lr_multiplier', -1.0, r'config.bn_bias_lr_multiplier=-1.0 must be a number >= 0'),
    ('platform', 'cuda', r'config.platform=.cuda. is unknown.*accelerator'),
])
def test_bad_values_name_the_field_and_the_fix(small_config, field, value, message):
  small_config[field] = value
  with pytest.raises(UserError, match=message):
    config_checks.validate(small_config, num_devices=8)


def test_archive_source_needs_an_existing_data_dir(small_config, tmp_path):
  small_config.data_source = 'archive'
  small_config.data_dir = ''
  with pytest.raises(UserError, match='config.data_dir is empty'):
    config_checks.validate(small_config, 8)
  small_config.data_dir = str(tmp_path / 'nope')
  with pytest.raises(UserError, match='does not exist'):
    config_checks.validate(small_config, 8)


def test_pmap_is_refused_with_several_processes(small_config):
  small_config.parallelism = 'pmap'
  config_checks.validate(small_config, num_devices=8, process_count=1)
  with pytest.raises(UserError, match='pmap runs in one process only.*shard_map'):
    config_checks.validate(small_config, num_devices=8, process_count=2)
  small_config.parallelism = 'shard_map'
  small_config.batch_size = 36
  with pytest.raises(UserError, match='not divisible by the 8 devices'):
    config_checks.validate(small_config, num_devices=8, process_count=2)


def test_steps_per_dispatch_and_the_cache_may_change_on_resume(small_config):
  saved = small_config.to_dict()
  small_config.steps_per_dispatch = 16  # Same results for any value.
  small_config.compilation_cache_dir = '/elsewhere'
  assert config_checks.check_resume(saved, small_config) == ['compilation_cache_dir',
                                                             'steps_per_dispatch']
  small_config.input_pipeline = 'host'  # Other random numbers: another trajectory.
  with pytest.raises(UserError, match="input_pipeline 'device' -> 'host'"):
    config_checks.check_resume(saved, small_config)


def test_good_config_passes(small_config):
  config_checks.validate(small_config, num_devices=8)
  config_checks.validate(small_config, num_devices=1)


@pytest.mark.tensorflow  # the host pipeline or the tfds source
@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_shipped_configs_are_valid():
  from configs import airbench, cpu, default, gpu, tpu
  for module in (default, cpu, gpu, tpu, airbench):
    config = module.get_config()
    if config.data_source == 'archive':
      config.data_source = 'synthetic'  # Their data_dir is the user's.
    config_checks.validate(config, num_devices=8)


def test_airbench_units_are_for_sgd_and_widths_for_models_that_have_them(small_config):
  small_config.update(lr_units='per_1024_examples', optimizer='adamw')
  with pytest.raises(UserError, match='per_1024_examples is defined for sgd only'):
    config_checks.validate(small_config, num_devices=8)
  small_config.update(optimizer='sgd', model='resnet20', model_widths=(16, 32, 64))
  with pytest.raises(UserError, match='model resnet20 has fixed widths'):
    config_checks.validate(small_config, num_devices=8)
  small_config.model = 'airbench'
  config_checks.validate(small_config, num_devices=8)


@pytest.mark.parametrize('changes, message', [
    ({'sharding': 'zero3'}, r'config.sharding=.zero3. is unknown.*fsdp_tensor'),
    ({'remat': 'all'}, r'config.remat=.all. is unknown.*block'),
    ({'remat': 'block', 'model': 'tutorial_cnn'}, r'tutorial_cnn has no blocks'),
    ({'mesh_shape': (3, -1)}, r'config.mesh_shape=\(3, -1\).*does not cover the 8 devices'),
    ({'mesh_shape': (4, 4)}, r'config.mesh_shape=\(4, 4\).*e.g. --config.mesh_shape'),
    ({'parallelism': 'pmap', 'sharding': 'fsdp'}, r'parallelism=pmap replicates.*parallelism=jit'),
    ({'parallelism': 'shard_map', 'mesh_shape': (4, 2)}, r'shard_map replicates'),
    ({'mesh_shape': (2, 4), 'batch_size': 35}, r'batch_size=35 is not divisible by the data '
                                                r'axis of mesh_shape=\(2, 4\) \(2\).*batch_size=34'),
    ({'micro_batches': 4, 'batch_size': 48}, r'batch_size=48 is not divisible by 4 micro-batches '
                                              r'x the 8 devices.*batch_size=32'),
    ({'micro_batches': 0}, r'config.micro_batches=0 must be an integer >= 1'),
    ({'profile_steps': '10'}, r'config.profile_steps=.10. must be "A:B".*profile_steps=100:110'),
    ({'profile_steps': '5:5'}, r'config.profile_steps=.5:5. must be "A:B" with 0 <= A < B'),
])
def test_large_model_settings_name_the_fix(small_config, changes, message):
  small_config.update(changes)
  with pytest.raises(UserError, match=message):
    config_checks.validate(small_config, num_devices=8)


def test_model_axis_must_stay_within_a_host(small_config):
  small_config.mesh_shape = (2, 4)
  config_checks.validate(small_config, num_devices=8, process_count=2)
  small_config.mesh_shape = (1, 8)
  with pytest.raises(UserError, match='spans? hosts|span hosts'):
    config_checks.validate(small_config, num_devices=8, process_count=2)


def test_a_batch_that_divides_the_data_axis_only_is_fine_under_a_model_axis(small_config):
  small_config.update(mesh_shape=(4, 2), sharding='fsdp_tensor', batch_size=36)
  config_checks.validate(small_config, num_devices=8)


@pytest.mark.parametrize('platform, found, plugins, expected', [
    ('', 'cpu', (), None),
    ('gpu', 'gpu', (), None),
    ('tpu', 'tpu', (), None),
    ('accelerator', 'gpu', (), None),
    ('accelerator', 'tpu', (), None),
    ('gpu', 'cpu', (), ['wants a GPU', 'runs on cpu', 'so this trains on cpu',
                        'pip install -r requirements.txt -e ".[cuda12]"', '".[cuda13]"']),
    ('gpu', 'cpu', ('jax-cuda13-plugin',), ['wants a GPU', 'jax-cuda13-plugin is installed, but '
                                            'its devices did not start']),
    ('tpu', 'cpu', (), ['wants a TPU', 'pip install -r requirements.txt -e ".[tpu]"',
                        './tpu_setup.sh install']),
    ('tpu', 'gpu', ('libtpu',), ['wants a TPU', 'runs on gpu', 'libtpu is installed']),
    ('accelerator', 'cpu', (), ['wants a GPU or TPU', '".[cuda12]"', '".[tpu]"']),
])
def test_a_gpu_or_tpu_config_on_another_platform_gets_one_warning(small_config, monkeypatch,
                                                                  platform, found, plugins,
                                                                  expected):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  small_config.platform = platform
  warning = config_checks.platform_warning(small_config, found, installed=plugins.__contains__)
  if expected is None:
    assert warning is None
  else:
    assert warning.startswith(f'config.platform={platform} ') and '\n' not in warning
    for part in expected:
      assert part in warning, warning
    assert warning.endswith("--config.platform='' silences this")


def test_the_platform_warning_names_a_chosen_jax_platforms(small_config, monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  small_config.platform = 'gpu'
  assert 'runs on cpu (JAX_PLATFORMS=cpu)' in config_checks.platform_warning(
      small_config, 'cpu', installed=lambda _: False)
