"""runtime/lease.py: one writer per workdir, locally (fcntl) and on gs:// (generation
preconditions against fake-gcs-server), with stale leases taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from cifar_jax.errors import ResourceError
from cifar_jax.runtime import lease

_HOLD = ('import sys, time; from cifar_jax.runtime import lease; '
         'held = lease.acquire(sys.argv[1], float(sys.argv[2])); print("held", flush=True); '
         'time.sleep(600)')


def hold_in_another_process(workdir, timeout_s=300.0):
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(workdir), str(timeout_s)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_live_local_holder_refuses_a_second_then_its_stale_lease_is_taken_over(
    tmp_path, capsys):
  proc = hold_in_another_process(tmp_path)
  try:
    with pytest.raises(ResourceError) as refused:
      lease.acquire(str(tmp_path))
    message = str(refused.value)
    assert f'{tmp_path} is in use by another run (pid {proc.pid} on {socket.gethostname()}' \
        in message and f'kill {proc.pid}' in message
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with lease.acquire(str(tmp_path)) as held:  # The kernel dropped the dead one's lock.
    assert f'a run that is gone (pid {proc.pid} ' in capsys.readouterr().err
    with open(held.path, encoding='utf-8') as f:
      assert json.load(f)['pid'] == os.getpid()
  with open(tmp_path / 'lease.json', encoding='utf-8') as f:
    assert f.read() == ''  # Released.
  with lease.acquire(str(tmp_path)):  # A released lease is taken without a warning.
    assert 'gone' not in capsys.readouterr().err


def test_is_gone_knows_this_hosts_processes_only():
  me = lease.holder_record()
  assert not lease.is_gone(me)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  assert lease.is_gone({**me, 'pid': dead.pid, 'pid_start': None})
  assert lease.is_gone({**me, 'pid_start': '1'})  # Our pid, but another process's start.
  assert not lease.is_gone({**me, 'host': 'another-host', 'pid': dead.pid})


def _upload(bucket_url, name, record):
  from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
  bucket, _, prefix = bucket_url[len('gs://'):].partition('/')
  blob = gcs.Client().bucket(bucket).blob(f'{prefix}/{name}')
  blob.upload_from_string(json.dumps(record))
  return blob


def test_gs_lease_refuses_a_live_holder_and_is_released(gcs):
  workdir = f'gs://{gcs.create_bucket("lease-live")}/run'
  held = lease.acquire(workdir)
  with pytest.raises(ResourceError, match=r'is in use by another run \(pid \d+ .*its last '
                                          r'heartbeat \d+ s ago'):
    lease.acquire(workdir)
  held.release()
  lease.acquire(workdir).release()


def test_gs_lease_of_a_silent_host_expires_and_of_a_dead_local_process_at_once(gcs, capsys):
  workdir = f'gs://{gcs.create_bucket("lease-stale")}/run'
  _upload(workdir, lease.NAME, {**lease.holder_record(), 'host': 'preempted-vm', 'pid': 7})
  with pytest.raises(ResourceError, match='preempted-vm'):
    lease.acquire(workdir, timeout_s=60)
  time.sleep(1.2)
  lease.acquire(workdir, timeout_s=1).release()  # Its heartbeat is now > 1 s old.
  assert 'took over the workdir lease of a run that is gone (pid 7 on preempted-vm' \
      in capsys.readouterr().err
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _upload(workdir, lease.NAME, {**lease.holder_record(), 'pid': dead.pid, 'pid_start': None})
  lease.acquire(workdir, timeout_s=600).release()  # This host's, gone: no waiting.
  assert f'(pid {dead.pid} on {socket.gethostname()}' in capsys.readouterr().err


def test_gs_holder_whose_lease_was_taken_stops_before_writing_more(gcs):
  workdir = f'gs://{gcs.create_bucket("lease-lost")}/run'
  held = lease.acquire(workdir, timeout_s=0.5)  # Heartbeat every 0.1 s.
  held.check()
  _upload(workdir, lease.NAME, {**lease.holder_record(), 'host': 'the-taker', 'pid': 9})
  deadline = time.time() + 10
  while True:
    try:
      held.check()
    except ResourceError as e:
      assert 'another run took over this workdir (pid 9 on the-taker' in str(e)
      break
    assert time.time() < deadline, 'the heartbeat did not notice'
    time.sleep(0.05)
  held.release()  # Leaves the taker's lease alone.
  with pytest.raises(ResourceError, match='the-taker'):
    lease.acquire(workdir, timeout_s=60)
