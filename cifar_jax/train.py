"""The training loop: `train_and_evaluate(config, workdir)`, readable top to bottom.

Also `evaluate_checkpoint(config, workdir)` for `--mode=eval`; both start from
`setup`. Needs no TensorFlow with `input_pipeline=device` and the archive or
synthetic source. The loop's cross-cutting concerns (when to log, the meter,
the progress line, the profiler, hooks) are the small helpers of `loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cifar_jax import (checkpointing, config_checks, dispatch, loop, memory as memory_lib,
                       metric_logging, optimizers, parallel, population, report as report_lib,
                       step as step_lib, workdir as workdir_lib)
from cifar_jax.data import cifar, device_pipeline, sources
from cifar_jax.errors import ResourceError, UserError
from cifar_jax.runtime import compilation_cache, faults, lease as lease_lib, preemption, storage


# --- setup: shared by training and --mode=eval ------------------------------------------
@dataclasses.dataclass
class Setup:
  """A run's data, devices and train state, before any checkpoint is read."""
  backend: parallel.Backend
  test_data: cifar.Split
  state: step_lib.TrainState  # Created in place in its sharding (a template for restores).
  train_data: cifar.Split | None = None  # Training only.
  train_feed: dict | None = None  # The splits on the devices (input_pipeline=device).
  test_feed: dict | None = None


def setup(config, training: bool) -> Setup:
  """Loads the data (the train split only for `training`), starts the backend, puts the
  data on the devices for the device pipeline and creates the train state. `config`
  has been validated."""
  cache = compilation_cache.configure(config.compilation_cache_dir)
  devices = jax.devices()
  members = int(config.population)
  logging.info('JAX %s: %d devices (%s) in %d process(es), backend %s, mesh %s, sharding %s, '
               '%s input pipeline, %d steps per dispatch, compilation cache %s%s',
               jax.__version__, len(devices), devices[0].platform, jax.process_count(),
               config.parallelism, tuple(config.mesh_shape), config.sharding,
               config.input_pipeline, config.steps_per_dispatch, cache or 'off',
               f', a population of {members} ({config.population_sharding}'
               f'{"; sweep " + config.population_sweep if config.population_sweep else ""})'
               if members > 1 else '')
  train_data = sources.load(config, 'train') if training else None
  test_data = sources.load(config, 'test')
  if training and cifar.steps_per_epoch(len(train_data.labels), config.batch_size) == 0:
    raise UserError(f'config.batch_size={config.batch_size} exceeds the '
                    f'{len(train_data.labels)} training examples; lower it')
  backend = parallel.create_backend(config.parallelism, devices,
                                    mesh_shape=tuple(config.mesh_shape), sharding=config.sharding,
                                    members=members,
                                    member_sharding=config.population_sharding)
  feeds = {}
  if config.input_pipeline == 'device':
    splits = {'train_feed': train_data, 'test_feed': test_data} if training else \
        {'test_feed': test_data}
    feeds = dict(zip(splits, _put_on_devices(backend, *splits.values())))
  num_train = len(train_data.labels) if training else None
  train_images = train_data.images if training else None
  if members > 1:
    state = population.create_state(config, members, num_train, train_images,
                                    layout=backend.state_layout)
  else:
    state = step_lib.create_train_state(config, jax.random.key(config.seed), num_train,
                                        train_images=train_images, layout=backend.state_layout)
  return Setup(backend, test_data, state, train_data, **feeds)


# --- evaluation, data placement and records -----------------------------------------------
def evaluate(backend: parallel.Backend, state, data: cifar.Split, config,
             test_feed: dict | None = None, tta: int = 0, layout=None) -> dict:
  """Top-1/top-5 accuracy and loss over exactly every example of `data`, with test-time
  augmentation level `tta` (`step.tta_logits`; recorded as `eval_tta`).

  With `test_feed` (the device-resident test split) one compiled call does the
  whole eval; otherwise host batches are fed one by one. The eval batch is
  rounded up to a multiple of the device count; the padding is masked, so the
  result does not depend on it. With several processes each reads its slice of
  every batch; the sums are global arrays, so every process gets the totals over
  the whole split. `layout`: the state's (default: `backend.state_layout(state)`).
  A population's record: each metric as the members' mean, per-member lists, their
  standard deviation and the ensemble's (`population.summarize`).
  """
  layout = backend.state_layout(state) if layout is None else layout
  if test_feed is not None:
    totals = backend.eval_dispatch(config, tta, layout)(state, test_feed)
  else:
    from cifar_jax.data import host_pipeline  # pylint: disable=g-import-not-at-top
    batch_size = backend.eval_batch_size(config.eval_batch_size)
    totals = None
    local = host_pipeline.eval_batches(data, config.dataset, batch_size, jax.process_index(),
                                        jax.process_count())
    for batch in backend.prefetch(local):
      sums = backend.eval_step(state, batch, tta, layout)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = backend.to_host(totals)
  if backend.members > 1:
    return {**population.summarize(totals, top5=config.dataset == 'cifar100'),
            'eval_tta': float(tta)}
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
  """Blocks of host batches for the dispatches `sizes`, each [k, b, ...] (zero-padded). A
  population's are [k, b, N, ...]: member i's batches from its own pipeline (seed + i),
  the member axis after the rows so that every backend splits the rows as a solo block's."""
  from cifar_jax.data import host_pipeline  # pylint: disable=g-import-not-at-top
  members = int(config.population)
  configs = [population.member_config(config, i) for i in range(members)] if members > 1 \
      else [config]
  streams = [host_pipeline.train_batches(train_data, c, start_step, start_step + sum(sizes),
                                          jax.process_index(), jax.process_count())
             for c in configs]
  def next_batch():
    if members == 1:
      return next(streams[0])
    batches = [next(s) for s in streams]
    return {key: np.stack([b[key] for b in batches], axis=1) for key in batches[0]}
  for n in sizes:
    block = [next_batch() for _ in range(n)]
    stacked = {}
    for key in block[0]:
      x = np.stack([b[key] for b in block])
      stacked[key] = np.concatenate([x, np.zeros((k - n,) + x.shape[1:], x.dtype)]) if n < k else x
    yield stacked


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


# --- training -------------------------------------------------------------------------------
class _Checkpoints:
  """The loop's checkpoints: never a state that went NaN, every metrics record durable
  before the checkpoint of its step can be, the best-by-accuracy one apart, and a save
  that fails for lack of space or permission (also in Orbax's background part) one
  `error:` line that names the last complete checkpoint, which it never touches."""

  def __init__(self, workdir: str, config, backend, hooks: loop.Hooks, lease, nbytes: int):
    with faults.translated('opening the checkpoints', checkpointing.checkpoints_dir(workdir)):
      self.manager = checkpointing.create_manager(workdir, config.checkpoint_max_to_keep)
      self.best = checkpointing.create_best_manager(workdir)
    self._backend, self._hooks, self._lease, self.nbytes = backend, hooks, lease, nbytes
    self._seed = int(config.seed)
    self.last_saved = None

  def restore(self, state):
    restored = checkpointing.restore(self.manager, state, _shardings(state))
    if restored is not None:
      logging.info('Resumed from %s at step %d.', self.manager.directory, step_lib.current_step(restored))
      self.last_saved = step_lib.current_step(restored)
    return restored

  def check_finite(self, carry) -> None:
    first_bad = np.atleast_1d(self._backend.to_host({'b': carry['first_bad']})['b'])
    bad = [(int(s), i) for i, s in enumerate(first_bad) if s >= 0]
    if bad:
      step, member = min(bad)
      which = (f' of population member {member} (seed {self._seed + member})'
               if len(first_bad) > 1 else '')
      raise UserError(f'non-finite loss or gradient norm at step {step}{which}; stopped '
                      f'without saving it. Last good checkpoint (kept): {self._kept()}. Lower '
                      '--config.learning_rate (or turn off half_precision) and rerun to '
                      'resume from it')

  def _kept(self) -> str:
    if self.last_saved is None:
      return 'none yet'
    return f'{self.manager.directory}/{self.last_saved}'

  @contextlib.contextmanager
  def _writing(self, manager, step: int | None, check_space: bool = True):
    """A failed save of `step` (None: whichever is in flight) as one line. Before it starts,
    in a single-process run, one with too little free space fails at once: a save that
    runs out of space midway leaves Orbax's background threads reporting for a while.
    Orbax reports an asynchronous failure at the next save or wait; the step it names is
    the one whose temporary directory failed."""
    if check_space and jax.process_count() == 1 and step is not None:
      free = faults.free_bytes(manager.directory)
      if free is not None and free < self.nbytes + (256 << 10):  # Orbax's metadata.
        raise ResourceError(faults.describe(
            faults.Fault(errno.ENOSPC, None), f'saving the checkpoint of step {step}',
            manager.directory, self.nbytes, self._complete(manager)))
    try:
      yield
    except ResourceError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Orbax wraps OSErrors in many kinds.
      fault = faults.find(e)
      if fault is None:
        raise
      partial = re.match(r'(.*/(\d+)\.orbax-checkpoint-tmp)', fault.path or '')
      if partial:
        fault, step = faults.Fault(fault.code, partial.group(1)), int(partial.group(2))
      what = f'saving the checkpoint of step {step}' if step is not None else 'a checkpoint save'
      raise ResourceError(faults.describe(
          fault, what, manager.directory, self.nbytes,
          self._complete(manager) + ' (a partial one is deleted when the run resumes)')) from e

  @staticmethod
  def _complete(manager) -> str:
    """What the error line says is kept: the newest complete checkpoint on disk."""
    try:
      manager.reload()
      latest = manager.latest_step()
    except Exception:  # pylint: disable=broad-except  # Only for the message.
      return 'the complete checkpoints are intact'
    if latest is None:
      return 'no checkpoint was complete yet'
    return f'the last complete checkpoint, {manager.directory}/{latest}, is intact'

  def check_saves(self) -> None:
    """Raises now if an asynchronous save has failed (Orbax would say so only at the next
    save or wait), so that no more steps are trained that could not be saved."""
    for manager in (self.manager, self.best):
      with self._writing(manager, None, check_space=False):
        manager.check_for_errors()

  def save(self, state, step: int, carry, writer) -> None:
    self.check_finite(carry)
    self.check_saves()
    self._lease.check()
    writer.flush()
    with self._writing(self.manager, step):
      checkpointing.save(self.manager, self._backend.get_state(state), step)
    self.last_saved = step
    self._hooks.after_save_started(step)

  def save_best(self, state, step: int, metrics: dict) -> None:
    self.check_saves()
    self._lease.check()
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}  # (Not a population's lists.)
    with self._writing(self.best, step):
      checkpointing.save(self.best, self._backend.get_state(state), step, metrics=scalars)

  def wait(self, failing: bool = False) -> None:
    """A save in flight lands before the process exits (also on an error: its message
    points at the last checkpoint). `failing`: the run is already ending with an error,
    which a failure here must not replace; it is logged instead."""
    for manager in (self.manager, self.best):
      try:
        with self._writing(manager, None):
          manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        if not failing:
          raise
        logging.warning('A checkpoint save in %s failed too: %s', manager.directory,
                        str(e).splitlines()[0][:300] if str(e) else type(e).__name__)

  def close(self) -> None:
    self.manager.close()
    self.best.close()


def _eval_and_record(run: Setup, state, layout, config, writer, step: int, total_steps: int,
                     tta: int) -> dict:
  """A full eval at `step`, written; at the last step also the confusion matrix."""
  metrics = evaluate(run.backend, state, run.test_data, config, run.test_feed, tta, layout)
  confusion = metrics.pop('confusion')
  writer.write_scalars(step, metrics)
  if step == total_steps:
    _write_confusion(writer, step, confusion, config.dataset, config.report)
  return metrics


def _first_dispatch(backend, carry, started: float, memory: dict) -> dict:
  """What the first train record of a launch carries: the first dispatch (one step,
  `dispatch.schedule`) timed with its compile, and the memory statistics."""
  jax.block_until_ready(carry)
  record = {'compile_seconds': time.perf_counter() - started, **memory, **backend.memory}
  members = f' for {backend.members} members' if backend.members > 1 else ''
  logging.info('First step (compile included): %.2f s; compiled step temporaries: %s per '
               'device, peak %s%s (memory.py checks it against the device\'s limit).',
               record['compile_seconds'], _mib(backend.memory.get('temp_bytes_per_device')),
               _mib(backend.memory.get('peak_bytes_per_device')), members)
  return record


def _report_progress(progress: loop.Progress, start: int, done: int, carry) -> None:
  # A copy: the carry itself is donated to the next call.
  progress.dispatched(start + done, jnp.copy(carry['first_bad']))


def _hold_workdir(config, workdir: str, allow_config_change: bool,
                  lease_timeout_s: float) -> lease_lib.Lease:
  """Validates the config, creates `workdir`, takes its lease (one writer per workdir) and
  checks that the config may resume the run there, if there is one. With several processes
  process 0 holds the lease and every process learns whether it got it."""
  config_checks.validate(config, jax.device_count(), jax.process_count())
  with faults.translated(f'creating --workdir={workdir}', workdir):
    storage.makedirs(workdir)
  held, problem = lease_lib.Lease(), None
  if jax.process_index() == 0:
    try:
      with faults.translated(f'taking the lease of --workdir={workdir}', workdir):
        held = lease_lib.acquire(workdir, lease_timeout_s)
    except ResourceError as e:
      problem = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if int(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))) and not problem:
      problem = ResourceError(f'process 0 could not take the lease of {workdir} (its error '
                              'line says why)')
  if problem:
    raise problem
  try:
    saved = workdir_lib.saved_config(workdir)
    if saved is not None:
      changed = config_checks.check_resume(saved, config, allow_config_change)
      if changed:
        logging.warning('Resuming with changed config fields: %s', ', '.join(changed))
  except BaseException:
    held.release()
    raise
  return held


def _warn_if_short_of_space(workdir: str, config, checkpoint_bytes: int) -> None:
  """One warning at start-up when a local workdir has less free space than the kept
  checkpoints, one being written and the best one need."""
  needed = (config.checkpoint_max_to_keep + 2) * checkpoint_bytes
  free = faults.free_bytes(workdir)
  if free is not None and free < needed:
    message = (f'{workdir} has {_mib(free)} free, less than the {_mib(needed)} that '
               f'{config.checkpoint_max_to_keep} + 2 checkpoints of {_mib(checkpoint_bytes)} '
               'need (config.checkpoint_max_to_keep + the one being written + the best); a '
               'save may run out of space')
    logging.warning('%s', message)
    print(f'warning: {message}', file=sys.stderr, flush=True)


def resolve_auto_sharding(config):
  """`config` with sharding=auto replaced by the layout `layout_search` picks for the
  devices present (compiled, not run; validated first, so a mistake is reported before
  any compile); any other config as it is."""
  if config.sharding != 'auto':
    return config
  from cifar_jax import chips, layout_search  # pylint: disable=import-outside-toplevel
  config_checks.validate(config, jax.device_count(), jax.process_count())
  devices = jax.devices()
  return layout_search.choose(config, devices, chips.by_device_kind(devices[0].device_kind)).config


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       hooks: loop.Hooks | None = None,
                       lease_timeout_s: float = lease_lib.DEFAULT_TIMEOUT_S) -> dict:
  """Trains `config` in `workdir`, resuming from its latest intact checkpoint.

  Returns the final eval metrics. Stops early (after a checkpoint) on SIGTERM
  or SIGINT, returning {'preempted_at_step': N}. `hooks` act between dispatches.
  Holds the workdir's lease throughout (`runtime.lease`; a gs:// lease whose heartbeat
  is `lease_timeout_s` old is taken over). Raises ResourceError when the storage
  fails the run (no space, no permission, a workdir in use).
  """
  config = resolve_auto_sharding(config)
  held = _hold_workdir(config, workdir, allow_config_change, lease_timeout_s)
  try:
    return _train(config, workdir, hooks or loop.Hooks(), held)
  finally:
    held.release()


def _train(config, workdir: str, hooks: loop.Hooks, held: lease_lib.Lease) -> dict:
  """train_and_evaluate's body, in a workdir it holds. Longer than a screen on purpose:
  setup, the loop and the finish read top to bottom in one place, each concern a named
  helper (`loop`, `_Checkpoints`)."""
  is_main = jax.process_index() == 0

  # --- data, devices and train state; resume from the newest intact checkpoint ---
  run = setup(config, training=True)
  backend, state = run.backend, run.state
  num_train = len(run.train_data.labels)
  epoch_steps = cifar.steps_per_epoch(num_train, config.batch_size)
  total_steps = optimizers.total_steps(config, num_train)
  layout = backend.state_layout(state)  # Every compiled function and placement takes it.
  memory = {'state_bytes_per_device': backend.state_bytes_per_device(state)}
  logging.info('Train state: %s per device (%s on a data %d x model %d mesh).',
               _mib(memory['state_bytes_per_device']), config.sharding, backend.data_size,
               backend.model_size)
  checkpoint_bytes = checkpointing.nbytes(state)
  if is_main:
    _warn_if_short_of_space(workdir, config, checkpoint_bytes)
  checkpoints = _Checkpoints(workdir, config, backend, hooks, held, checkpoint_bytes)
  state = checkpoints.restore(state) or state
  start_step = step_lib.current_step(state)
  state = backend.put_state(state, layout)
  # Records after start_step (logged by a launch that died before checkpointing them) go:
  # those steps run again.
  writer = metric_logging.create_writer(workdir, is_main, start_step)
  if is_main:
    workdir_lib.write_config(workdir, config)
    logging.info('%d train / %d test examples; %d steps/epoch, %d steps in all.', num_train,
                 len(run.test_data.labels), epoch_steps, total_steps)

  # --- loop: one compiled call per dispatch of up to `steps_per_dispatch` steps ---
  window = config_checks.profile_window(config)  # Dispatches start and stop at its ends.
  sizes = dispatch.schedule(start_step, total_steps, config.steps_per_dispatch, (
      config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps),
                            boundaries=window or ())
  run_steps = backend.train_dispatch(config.input_pipeline, config, layout)
  feeds = itertools.repeat(run.train_feed) if run.train_feed is not None else backend.prefetch(
      _host_blocks(run.train_data, config, start_step, sizes, config.steps_per_dispatch),
      put=backend.put_batches)
  meter = loop.TrainMeter(backend)
  step, first_record, eval_metrics, result = start_step, {}, {}, None
  with preemption.PreemptionGuard() as guard, _profile_dir(workdir, bool(window)) as traces, \
      loop.Progress(start_step, total_steps) as progress:
    profiler = loop.ProfileWindow(window, traces, workdir)
    try:
      for index, n in enumerate(sizes):
        feed = next(feeds)  # (The host pipeline's start-up is not compile time.)
        profiler.before(step, meter.carry)
        started = time.perf_counter()
        if index == 0:  # Compiled before it runs: a population too big for memory stops here.
          memory_lib.check_population_fits(config, backend, run_steps, state, meter.carry, feed)
        state, carry = run_steps(state, meter.carry, feed, n, on_step=functools.partial(
            _report_progress, progress, step))
        step += n
        meter.add(carry, n)
        profiler.after(step, carry)
        if index == 0:
          first_record = _first_dispatch(backend, carry, started, memory)
        if loop.itstime(step, config.log_every_steps, total_steps):
          checkpoints.check_finite(carry)
          checkpoints.check_saves()
          writer.write_scalars(step, {**meter.record(config.batch_size),
                                      'epoch': step / epoch_steps, **first_record})
          first_record = {}
        with meter.paused():
          if loop.itstime(step, config.eval_every_steps, total_steps):
            checkpoints.check_finite(carry)
            tta = config.tta if step == total_steps or config.tta_every_eval else 0
            eval_metrics = _eval_and_record(run, state, layout, config, writer, step, total_steps,
                                            tta)
            checkpoints.save_best(state, step, eval_metrics)
          if loop.itstime(step, config.checkpoint_every_steps, total_steps):
            checkpoints.save(state, step, carry, writer)
          state = hooks.after_dispatch(step, state)
          if step < total_steps and guard.stop_requested(index):
            if checkpoints.last_saved != step:
              checkpoints.save(state, step, carry, writer)
            logging.warning('%s received: stopped after step %d and saved a checkpoint in %s; '
                            'rerun the same command to resume.', guard.signal_name, step,
                            checkpoints.manager.directory)
            result = {'preempted_at_step': float(step)}
            break

      # Still inside the guard: a second Ctrl-C while the last save finishes exits at once.
      if result is None and not eval_metrics:  # Nothing left to train: still report the eval.
        eval_metrics = _eval_and_record(run, state, layout, config, writer, total_steps,
                                        total_steps, config.tta)
    except BaseException:
      checkpoints.wait(failing=True)
      raise
    checkpoints.wait()

  # --- finish ---
  checkpoints.close()
  writer.flush()
  writer.close()
  if is_main and result is None and config.report:
    _write_report(workdir)
  return result or eval_metrics


def evaluate_checkpoint(config, workdir: str, member: str = '') -> dict:
  """Evaluates a checkpoint of `workdir` on the full test split; writes nothing there. A
  population's: every member and the ensemble, or (`member`) member i's or the
  ensemble's metrics alone, under the solo names."""
  config = resolve_auto_sharding(config)
  config_checks.validate(config, jax.device_count(), jax.process_count())
  which = workdir_lib.parse_member(member, int(config.population))
  directory = checkpointing.checkpoints_dir(workdir)
  if not directory.exists():
    raise UserError(f'{directory} does not exist; train first, or point --workdir at a run')
  run = setup(config, training=False)
  manager = checkpointing.open_read_only(workdir)
  wanted = config.checkpoint_step if config.checkpoint_step >= 0 else None
  state = checkpointing.restore(manager, run.state, _shardings(run.state), step=wanted)
  manager.close()
  if state is None:
    raise UserError(f'{directory} holds no checkpoint; train first')
  step = step_lib.current_step(state)
  layout = run.backend.state_layout(state)
  metrics = evaluate(run.backend, run.backend.put_state(state, layout), run.test_data, config,
                     run.test_feed, config.tta, layout)
  metrics.pop('confusion')
  if isinstance(which, int):
    metrics = {name: metrics[f'{name}_members'][which] for name in metrics
               if f'{name}_members' in metrics} | {'eval_count': metrics['eval_count'],
                                                    'eval_tta': metrics['eval_tta'],
                                                    'member': float(which)}
  elif which == 'ensemble':
    metrics = {f'eval_{name[len("ensemble_"):]}': v for name, v in metrics.items()
               if name.startswith('ensemble_')} | {'eval_count': metrics['eval_count'],
                                                   'eval_tta': metrics['eval_tta']}
  logging.info('Eval of %s/%d%s: %s', directory, step,
               ' (EMA weights)' if state.ema_params is not None else '', metrics)
  return {'checkpoint_step': float(step), **metrics}
