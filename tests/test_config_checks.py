import pytest

from cifar_jax import config_checks
from cifar_jax.errors import UserError


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
  small_config.input_pipeline = 'device'  # Other random numbers: another trajectory.
  with pytest.raises(UserError, match="input_pipeline 'host' -> 'device'"):
    config_checks.check_resume(saved, small_config)


def test_good_config_passes(small_config):
  config_checks.validate(small_config, num_devices=8)
  config_checks.validate(small_config, num_devices=1)


def test_shipped_configs_are_valid():
  from configs import cpu, default, gpu, tpu
  for module in (default, cpu, gpu, tpu):
    config = module.get_config()
    if config.data_source == 'archive':
      config.data_source = 'synthetic'  # Their data_dir is the user's.
    config_checks.validate(config, num_devices=8)
