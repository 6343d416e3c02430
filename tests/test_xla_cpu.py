"""The XLA:CPU convolution flag: added only when jaxlib accepts it, never over the user's."""
import json

from cifar_jax.runtime import xla_cpu


def test_added_to_the_users_other_flags_when_supported():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert 'added' in xla_cpu.use_fast_convolutions(env, supported=lambda: True)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {xla_cpu.FLAG}'
  env = {}
  xla_cpu.use_fast_convolutions(env, supported=lambda: True)
  assert env['XLA_FLAGS'] == xla_cpu.FLAG


def test_the_users_own_setting_wins_and_an_unknown_flag_is_never_added():
  mine = f'--{xla_cpu.FLAG_NAME}=individual_convolution'
  env = {'XLA_FLAGS': mine}
  assert 'kept' in xla_cpu.use_fast_convolutions(env, supported=lambda: True)
  assert env['XLA_FLAGS'] == mine
  env = {xla_cpu.OPT_OUT: '1'}
  assert 'left at XLA:CPU defaults' in xla_cpu.use_fast_convolutions(env, supported=lambda: True)
  assert 'XLA_FLAGS' not in env
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert 'does not accept' in xla_cpu.use_fast_convolutions(env, supported=lambda: False)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'


def test_the_probe_asks_a_child_process_once_per_jaxlib(tmp_path, monkeypatch):
  path = tmp_path / 'verdicts.json'
  assert xla_cpu.flag_supported(str(path))  # This jaxlib (0.10.x) has the flag.
  verdicts = json.loads(path.read_text())
  assert list(verdicts.values()) == [True]
  # A cached verdict is used as is: no child process.
  path.write_text(json.dumps({k: False for k in verdicts}))
  monkeypatch.setattr(xla_cpu.subprocess, 'run', None)
  assert not xla_cpu.flag_supported(str(path))


def test_a_flag_xla_does_not_know_is_refused_by_the_probe(tmp_path, monkeypatch):
  monkeypatch.setattr(xla_cpu, 'FLAG', '--xla_cpu_no_such_flag_for_the_test=1')
  assert not xla_cpu.flag_supported(str(tmp_path / 'verdicts.json'))
