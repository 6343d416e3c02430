"""The training loop: `train_and_evaluate(config, workdir)`, readable top to bottom.

Also `evaluate_checkpoint(config, workdir)` for `--mode=eval`. Needs no
TensorFlow with `input_pipeline=device` and the archive or synthetic source.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cifar_jax import (checkpointing, config_checks, dispatch, metric_logging, optimizers,
                       parallel, report as report_lib, step as step_lib, workdir as workdir_lib)
from cifar_jax.data import cifar, device_pipeline, sources
from cifar_jax.errors import UserError
from cifar_jax.runtime import compilation_cache, preemption, storage

# Test-only fault injection, e.g. CIFAR_JAX_TEST_FAULT=nan@5 (NaN images at step 5),
# kill_in_save@4 (SIGKILL this process right after the save of step 4 has started) or
# sigterm@6 (SIGTERM to itself once step 6 is done, as a preemption notice would).
_FAULT = os.environ.get('CIFAR_JAX_TEST_FAULT', '')


def _fault(kind: str, step: int) -> bool:
  return _FAULT == f'{kind}@{step}'


def _fault_step(kind: str) -> int:
  return int(_FAULT.split('@')[1]) if _FAULT.startswith(kind + '@') else -1


def evaluate(backend: parallel.Backend, state, data: cifar.Split, config,
             test_feed: dict | None = None, tta: int = 0) -> dict:
  """Top-1/top-5 accuracy and loss over exactly every example of `data`, with test-time
  augmentation level `tta` (`step.tta_logits`; recorded as `eval_tta`).

  With `test_feed` (the device-resident test split) one compiled call does the
  whole eval; otherwise host batches are fed one by one. The eval batch is
  rounded up to a multiple of the device count; the padding is masked, so the
  result does not depend on it. With several processes each reads its slice of
  every batch; the sums are global arrays, so every process gets the totals over
  the whole split.
  """
  if test_feed is not None:
    totals = backend.eval_dispatch(config, tta)(state, test_feed)
  else:
    from cifar_jax.data import host_pipeline  # pylint: disable=g-import-not-at-top
    batch_size = backend.eval_batch_size(config.eval_batch_size)
    totals = None
    local = host_pipeline.eval_batches(data, config.dataset, batch_size, jax.process_index(),
                                        jax.process_count())
    for batch in backend.prefetch(local):
      sums = backend.eval_step(state, batch, tta)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = backend.to_host(totals)
  count = totals['count']
  metrics = {'eval_loss': totals['loss_sum'] / count,
             'eval_accuracy': totals['correct'] / count,
             'eval_count': count,
             'eval_tta': float(tta),
             'confusion': totals['confusion']}  # Popped by the caller: not a scalar.
  if config.dataset == 'cifar100':
    metrics['eval_top5_accuracy'] = totals['correct_top5'] / count
  return metrics


def _put_on_devices(backend: parallel.Backend, *splits: cifar.Split) -> list[dict]:
  """`splits` whole on every device, or an `error:` line (before any copy) if they would
  not fit in device memory."""
  problem = device_pipeline.check_fits(device_pipeline.nbytes(*(a for s in splits for a in s)),
                                       jax.local_devices()[0].memory_stats())
  if problem:
    raise UserError(f'config.input_pipeline=device: {problem}; use '
                    '--config.input_pipeline=host (tf.data on the host) instead')
  return [backend.put_data({'images': s.images, 'labels': s.labels}) for s in splits]


def _host_blocks(train_data, config, start_step: int, sizes: list[int], k: int):
  """Blocks of host batches for the dispatches `sizes`, each [k, b, ...] (zero-padded)."""
  from cifar_jax.data import host_pipeline  # pylint: disable=g-import-not-at-top
  batches = host_pipeline.train_batches(train_data, config, start_step,
                                         start_step + sum(sizes), jax.process_index(),
                                         jax.process_count())
  for n in sizes:
    block = [next(batches) for _ in range(n)]
    stacked = {}
    for key in block[0]:
      x = np.stack([b[key] for b in block])
      stacked[key] = np.concatenate([x, np.zeros((k - n,) + x.shape[1:], x.dtype)]) if n < k else x
    yield stacked


def _backend(config, devices) -> parallel.Backend:
  return parallel.Backend(config.parallelism, devices, mesh_shape=tuple(config.mesh_shape),
                          sharding=config.sharding)


def _shardings(state):
  """Each leaf's sharding: what a restore must give it (checkpointing.restore)."""
  return jax.tree.map(lambda x: x.sharding, state)


def _write_confusion(writer, step: int, confusion: np.ndarray, dataset: str,
                     image: bool = True) -> None:
  """The final eval's confusion matrix and per-class accuracy: a metrics.jsonl record,
  TensorBoard scalars `class_accuracy/<name>` and (with `image`) an image."""
  names = cifar.CLASS_NAMES[dataset]
  accuracy = report_lib.class_accuracy(confusion, names)
  writer.write_json(step, {'confusion_matrix': confusion.astype(int).tolist(),
                           'class_accuracy': accuracy})
  if not image:
    return
  try:
    writer.write_image(step, 'confusion_matrix', report_lib.confusion_png(confusion, names, step))
  except ImportError as e:
    logging.warning('No confusion matrix image (%s); pip install matplotlib.', e)


@contextlib.contextmanager
def _profile_dir(workdir, profiling: bool):
  """Where the profiler writes: WORKDIR/plugins/profile's parent. The profiler writes
  local files only, so a trace for a gs:// workdir goes to a temporary directory and is
  uploaded at the end of the loop."""
  if not profiling or not storage.is_remote(workdir):
    yield str(workdir)
    return
  with tempfile.TemporaryDirectory(prefix='cifar_jax_profile_') as local:
    yield local
    count = storage.upload_tree(local, workdir)
    logging.info('Uploaded the profile (%d files) to %s/plugins/profile.', count, workdir)


def _write_report(workdir: str) -> None:
  """report.png at the end of a run; a plotting problem never fails the run."""
  try:
    logging.info('Report: %s', report_lib.write_report(workdir))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('No report.png (%s: %s).', type(e).__name__, e)


def _mib(nbytes) -> str:
  return 'n/a' if nbytes is None else f'{nbytes / 2**20:.1f} MiB'


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest intact checkpoint.

  Returns the final eval metrics. Stops early (after a checkpoint) on SIGTERM
  or SIGINT, returning {'preempted_at_step': N}.
  """
  # --- devices and config checks (before any data loading or compile) ---
  devices = jax.devices()
  config_checks.validate(config, len(devices), jax.process_count())
  is_main = jax.process_index() == 0
  saved = workdir_lib.saved_config(workdir)
  if saved is not None:
    changed = config_checks.check_resume(saved, config, allow_config_change)
    if changed:
      logging.warning('Resuming with changed config fields: %s', ', '.join(changed))
  storage.makedirs(workdir)
  cache = compilation_cache.configure(config.compilation_cache_dir)
  logging.info('JAX %s: %d devices (%s) in %d process(es), backend %s, mesh %s, sharding %s, '
               '%s input pipeline, %d steps per dispatch, compilation cache %s', jax.__version__,
               len(devices), devices[0].platform, jax.process_count(), config.parallelism,
               tuple(config.mesh_shape), config.sharding, config.input_pipeline,
               config.steps_per_dispatch, cache or 'off')

  # --- input ---
  train_data = sources.load(config, 'train')
  test_data = sources.load(config, 'test')
  num_train = len(train_data.labels)
  steps_per_epoch = cifar.steps_per_epoch(num_train, config.batch_size)
  total_steps = optimizers.total_steps(config, num_train)
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} exceeds the {num_train} training '
                    'examples; lower it')
  backend = _backend(config, devices)
  on_device = config.input_pipeline == 'device'
  train_feed, test_feed = _put_on_devices(backend, train_data, test_data) if on_device \
      else (None, None)

  # --- model, optimizer and train state (created in place, in its sharding) ---
  state = step_lib.create_train_state(config, jax.random.key(config.seed), num_train,
                                      train_images=train_data.images,
                                      layout=backend.state_shardings)
  memory = {'state_bytes_per_device': backend.state_bytes_per_device(state)}
  logging.info('Train state: %s per device (%s on a data %d x model %d mesh).',
               _mib(memory['state_bytes_per_device']), config.sharding, backend.data_size,
               backend.model_size)

  # --- checkpoint: resume from the newest intact one, onto this mesh and sharding ---
  manager = checkpointing.create_manager(workdir, config.checkpoint_max_to_keep)
  best_manager = checkpointing.create_best_manager(workdir)
  restored = checkpointing.restore(manager, state, _shardings(state))
  if restored is not None:
    state = restored
    logging.info('Resumed from %s at step %d.', manager.directory, int(state.step))
  start_step = int(state.step)
  last_saved = start_step if restored is not None else None
  state = backend.put_state(state)

  # --- logging ---
  # Records after start_step (logged by a launch that died before checkpointing them) go:
  # those steps run again.
  writer = metric_logging.create_writer(workdir, is_main, start_step)
  if is_main:  # Written whole (other processes may be reading it).
    workdir_lib.write_config(workdir, config)
    logging.info('%d train / %d test examples; %d steps/epoch, %d steps in all.', num_train,
                 len(test_data.labels), steps_per_epoch, total_steps)
  report = metric_logging.ProgressReporter(start_step, total_steps)

  def check_finite():
    bad = int(np.asarray(jax.device_get(carry['first_bad'])).reshape(-1)[0])
    if bad >= 0:
      kept = f'{manager.directory}/{last_saved}' if last_saved is not None else 'none yet'
      raise UserError(f'non-finite loss or gradient norm at step {bad}; stopped without saving '
                      f'it. Last good checkpoint (kept): {kept}. Lower --config.learning_rate '
                      '(or turn off half_precision) and rerun to resume from it')

  def save_checkpoint():
    nonlocal last_saved
    check_finite()  # Never save a state that went NaN.
    writer.flush()  # Every record up to `step` is durable before its checkpoint can be.
    checkpointing.save(manager, backend.get_state(state), step)
    last_saved = step
    if _fault('kill_in_save', step):
      os.kill(os.getpid(), signal.SIGKILL)

  # --- loop: one compiled call per dispatch of up to `steps_per_dispatch` steps ---
  k = int(config.steps_per_dispatch)
  profile = config_checks.profile_window(config)  # Dispatches start and stop at its ends.
  sizes = dispatch.schedule(start_step, total_steps, k, (
      config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps),
                            boundaries=profile or ())
  run_steps = backend.train_dispatch(config.input_pipeline, config)
  feeds = itertools.repeat(train_feed) if on_device else \
      backend.prefetch(_host_blocks(train_data, config, start_step, sizes, k), put=backend.put_batches)
  poison = backend.put_scalar(_fault_step('nan'))
  carry = backend.put_state(dispatch.new_carry())
  eval_metrics, result = {}, None
  first_record = {}  # What only the first train record of this launch carries.
  summed_steps, t_log = 0, time.perf_counter()
  step = start_step
  tracing = False  # Inside the profiler window.
  with preemption.PreemptionGuard() as guard, _profile_dir(workdir, bool(profile)) as profile_dir:
    try:
      for dispatch_index, n in enumerate(sizes):
        feed = next(feeds)  # (The host pipeline's start-up is not compile time.)
        if profile and step == profile[0]:
          jax.block_until_ready(carry)
          tracing = True
          jax.profiler.start_trace(profile_dir)  # -> plugins/profile/<time>/*.xplane.pb
          logging.info('Profiling steps %d..%d into %s/plugins/profile.', step + 1, profile[1],
                       workdir)
        t_dispatch = time.perf_counter()
        state, carry = run_steps(state, carry, feed, n, poison)
        if tracing and step + n == profile[1]:
          jax.block_until_ready(carry)
          jax.profiler.stop_trace()
          tracing = False
        if dispatch_index == 0:  # One step (dispatch.schedule): compile + one step.
          jax.block_until_ready(carry)
          first_record['compile_seconds'] = time.perf_counter() - t_dispatch
          first_record.update(memory, **backend.memory)
          logging.info('First step (compile included): %.2f s; compiled step temporaries: %s '
                       'per device.', first_record['compile_seconds'],
                       _mib(backend.memory.get('temp_bytes_per_device')))
        step += n
        summed_steps += n
        report(step)
        if _fault('sigterm', step):
          os.kill(os.getpid(), signal.SIGTERM)
        if step % config.log_every_steps == 0 or step == total_steps:
          check_finite()
          sums = backend.to_host(carry['sums'])  # Syncs here only.
          host = {name: total / summed_steps for name, total in sums.items()}
          host['images_per_sec'] = summed_steps * config.batch_size / (time.perf_counter() - t_log)
          host['epoch'] = step / steps_per_epoch
          writer.write_scalars(step, {**host, **first_record})
          first_record = {}
          carry = backend.put_state(dispatch.new_carry())
          summed_steps = 0
          t_log = time.perf_counter()
        if step % config.eval_every_steps == 0 or step == total_steps:
          check_finite()
          tta = config.tta if step == total_steps or config.tta_every_eval else 0
          eval_metrics = evaluate(backend, state, test_data, config, test_feed, tta)
          confusion = eval_metrics.pop('confusion')
          writer.write_scalars(step, eval_metrics)
          if step == total_steps:
            _write_confusion(writer, step, confusion, config.dataset, config.report)
          checkpointing.save(best_manager, backend.get_state(state), step, metrics=eval_metrics)
          t_log = time.perf_counter()
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          save_checkpoint()
          t_log = time.perf_counter()
        if step < total_steps and guard.stop_requested(dispatch_index):
          if last_saved != step:
            save_checkpoint()
          logging.warning('%s received: stopped after step %d and saved a checkpoint in %s; rerun '
                          'the same command to resume.', guard.signal_name, step, manager.directory)
          result = {'preempted_at_step': float(step)}
          break

      # Still inside the guard: a second Ctrl-C while the last save finishes exits at once.
      if result is None and not eval_metrics:  # Nothing left to train: still report the eval.
        eval_metrics = evaluate(backend, state, test_data, config, test_feed, config.tta)
        confusion = eval_metrics.pop('confusion')
        writer.write_scalars(total_steps, eval_metrics)
        _write_confusion(writer, total_steps, confusion, config.dataset, config.report)
    finally:
      # Also on an error (e.g. NaN): a save in flight must land before the process exits,
      # since the error message points at it.
      manager.wait_until_finished()
      best_manager.wait_until_finished()
  manager.close()
  best_manager.close()
  writer.flush()
  writer.close()
  if is_main and result is None and config.report:
    _write_report(workdir)
  return result or eval_metrics


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Evaluates a checkpoint of `workdir` on the full test split; writes nothing there."""
  devices = jax.devices()
  config_checks.validate(config, len(devices), jax.process_count())
  directory = checkpointing.checkpoints_dir(workdir)
  if not directory.exists():
    raise UserError(f'{directory} does not exist; train first, or point --workdir at a run')
  compilation_cache.configure(config.compilation_cache_dir)
  test_data = sources.load(config, 'test')
  backend = _backend(config, devices)
  test_feed = _put_on_devices(backend, test_data)[0] if config.input_pipeline == 'device' else None
  template = step_lib.create_train_state(config, jax.random.key(config.seed),
                                         layout=backend.state_shardings)
  manager = checkpointing.open_read_only(workdir)
  wanted = config.checkpoint_step if config.checkpoint_step >= 0 else None
  state = checkpointing.restore(manager, template, _shardings(template), step=wanted)
  if state is None:
    raise UserError(f'{directory} holds no checkpoint; train first')
  step = int(state.step)
  metrics = evaluate(backend, backend.put_state(state), test_data, config, test_feed, config.tta)
  metrics.pop('confusion')
  logging.info('Eval of %s/%d%s: %s', directory, step,
               ' (EMA weights)' if state.ema_params is not None else '', metrics)
  manager.close()
  return {'checkpoint_step': float(step), **metrics}
