"""cifar_jax/workdir.py: a run read back; and runs written by earlier versions still restore,
evaluate and resume (tests/fixtures/run_a20895f, written before the package was reshaped)."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from cifar_jax import train, workdir as workdir_lib
from cifar_jax.errors import UserError
from configs import default
from helpers import JAX_CACHE, checkpoint_arrays, metrics_records

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'run_a20895f')


@pytest.fixture
def old_run(tmp_path):
  run = tmp_path / 'run'
  shutil.copytree(FIXTURE, run)
  return str(run)


def _path(key: str) -> tuple:
  """`['a'][0].value` and `['a']['0']['value']` -> ('a', '0'): the same leaf, named by the
  live state and by the raw checkpoint."""
  return tuple(t for t in re.findall(r"\[\'?([^\]']+)\'?\]|\.(\w+)", key) for t in t
               if t and t != 'value')


def _leaves(tree) -> dict:
  return {_path(jax.tree_util.keystr(p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_config_written_before_a_field_existed_reads_with_its_default(old_run):
  path = os.path.join(old_run, 'config.json')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  del saved['platform'], saved['whiten_bias_epochs']  # As if written before they existed.
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(saved, f)
  config = workdir_lib.read_config(old_run)
  defaults = default.get_config()
  assert config.platform == defaults.platform and \
      config.whiten_bias_epochs == defaults.whiten_bias_epochs == 3.0
  assert config.model == 'airbench' and config.model_widths == (8, 8, 8)  # A tuple again.
  assert workdir_lib.saved_config(old_run)['whiten_bias_epochs'] == 3.0


def test_an_old_checkpoint_restores_bit_identically(old_run):
  config, state, step, source = workdir_lib.load_state(old_run, 'latest')
  assert step == 4 and 'EMA weights' in source
  raw = {_path(k): v for k, v in
         checkpoint_arrays(os.path.join(old_run, 'checkpoints', '4', 'default')).items()}
  restored = _leaves({'params': state.params, 'batch_stats': state.batch_stats,
                      'opt_state': state.opt_state, 'ema_params': state.ema_params,
                      'lookahead': state.lookahead})
  assert len(restored) == len(raw) - 1  # All but 'step'.
  for key, value in restored.items():
    np.testing.assert_array_equal(value, raw[key], err_msg=key)
  assert config.lookahead_every == 2 and state.lookahead is not None


@pytest.mark.e2e  # Compiles and trains whole models: the slow tier.
def test_an_old_run_evaluates_as_it_did_and_resumes(old_run):
  config = workdir_lib.read_config(old_run)
  config.compilation_cache_dir = JAX_CACHE  # This process's (conftest).
  recorded = [r for r in metrics_records(old_run) if 'eval_loss' in r][-1]
  metrics = train.evaluate_checkpoint(config, old_run)
  assert metrics['checkpoint_step'] == 4 and metrics['eval_count'] == recorded['eval_count']
  np.testing.assert_allclose(metrics['eval_loss'], recorded['eval_loss'], rtol=1e-5)
  assert metrics['eval_accuracy'] == recorded['eval_accuracy']
  config.num_train_steps = 6  # A longer run: a safe change.
  result = train.train_and_evaluate(config, old_run)
  assert result['eval_count'] == recorded['eval_count']
  assert [r['step'] for r in metrics_records(old_run) if 'train_loss' in r] == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(old_run, 'checkpoints'))) == ['4', '6']


def test_a_missing_run_is_one_error_line(tmp_path):
  with pytest.raises(UserError, match='config.json does not exist'):
    workdir_lib.read_config(str(tmp_path))
  with pytest.raises(UserError, match='must be best, latest or a step number'):
    workdir_lib.load_state(FIXTURE, 'newest')
