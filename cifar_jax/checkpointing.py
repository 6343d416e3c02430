"""Orbax checkpoints of the train state's arrays, in `workdir/checkpoints`.

Only the arrays are saved (step, params, BatchNorm statistics, optimizer state,
EMA); the graph, optimizer and schedule are rebuilt from the config, and the
data position follows from the step. Restores build their target shapes and
shardings from the current devices, never from the topology that wrote the
checkpoint, so a run can resume on another device count or backend.

Saves are asynchronous and atomic, so a crash mid-save leaves the previous
checkpoint as the latest. Orbax decides what is complete: locally it writes a
temporary directory and renames it; on gs:// (no rename) it writes the step's
directory in place and marks it complete with `commit_success.txt` last, and
lists only marked steps. A damaged checkpoint is skipped with a warning, never
deleted. A save that never completed (the process was killed, the disk filled) leaves
a `<step>.orbax-checkpoint-tmp` directory: no restore reads it, and the next training
run's managers delete it (`cleanup_tmp_directories`) once they hold the workdir's lease.
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging

from cifar_jax.errors import UserError
from cifar_jax.runtime import storage
from cifar_jax import step as step_lib
from cifar_jax.step import TrainState

_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'ema_params', 'lookahead', 'hparams')


# Orbax saves each replicated array "replica-parallel": every replica writes a slice, cut
# with one eager jax op per array and replica. For CIFAR-sized arrays that is ~460 tiny
# compiles (4.3 s on CPU, more on TPU) at a process's first save and no I/O gain; arrays
# under this size are written whole by one replica instead (first save: 0.09 s).
_MIN_BYTES_FOR_REPLICA_PARALLEL_SAVE = 4 << 20


def _use_whole_array_saves_for_small_arrays() -> None:
  """Registers Orbax's jax.Array handler with the threshold above (process-wide, idempotent)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=_MIN_BYTES_FOR_REPLICA_PARALLEL_SAVE),
      override=True)


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  # With several processes, two managers saving the same step at once would share the
  # barrier `_async_write_complete.<step>` and fail ("already ongoing"); a prefix apiece.
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def checkpoints_dir(workdir):
  """`workdir/checkpoints` (an epath.Path: local or gs://)."""
  return storage.path(workdir) / 'checkpoints'


def create_manager(workdir, max_to_keep: int = 3) -> ocp.CheckpointManager:
  _use_whole_array_saves_for_small_arrays()
  return ocp.CheckpointManager(
      checkpoints_dir(workdir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
          cleanup_tmp_directories=True, multiprocessing_options=_barrier_prefix('checkpoints')))


def open_read_only(workdir, directory=None) -> ocp.CheckpointManager:
  """The checkpoints of `workdir` (or of `directory`, e.g. its best_checkpoint) for reading
  only (eval, predict and export change nothing)."""
  return ocp.CheckpointManager(
      directory or checkpoints_dir(workdir),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def best_dir(workdir):
  return storage.path(workdir) / 'best_checkpoint'


def create_best_manager(workdir) -> ocp.CheckpointManager:
  """The best checkpoint by eval accuracy, apart from the rotating ones."""
  _use_whole_array_saves_for_small_arrays()
  return ocp.CheckpointManager(
      best_dir(workdir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda metrics: metrics['eval_accuracy'], best_mode='max',
          keep_checkpoints_without_metrics=False, create=True, enable_async_checkpointing=True,
          cleanup_tmp_directories=True, multiprocessing_options=_barrier_prefix('best')))


def _arrays(state: TrainState) -> dict:
  return {f: getattr(state, f) for f in _FIELDS if getattr(state, f) is not None}


def nbytes(state: TrainState) -> int:
  """The bytes a checkpoint of `state` holds (every array once, whatever its sharding)."""
  return sum(x.nbytes for x in jax.tree.leaves(_arrays(state)))


def save(manager: ocp.CheckpointManager, state: TrainState, step: int,
         metrics: dict | None = None) -> bool:
  """Starts an asynchronous save of `state` (at host-known `step`); False if that step exists.

  An existing step directory (for instance a damaged one that the resume
  skipped) is left alone, never overwritten.
  """
  if step in manager.all_steps():
    logging.warning('Not overwriting the existing checkpoint %s/%d.', manager.directory, step)
    return False
  return manager.save(step, args=ocp.args.StandardSave(_arrays(state)), metrics=metrics)


def restore(manager: ocp.CheckpointManager, template: TrainState, sharding,
            step: int | None = None) -> TrainState | None:
  """The newest intact checkpoint (or exactly `step`) as a state like `template`.

  `sharding`: the restored leaves' shardings, one for all or a tree like
  `template` (e.g. `jax.tree.map(lambda x: x.sharding, template)`). Every leaf
  gets its target sharding explicitly, whatever mesh and layout wrote the
  checkpoint (Orbax would otherwise keep the saved layout), so a run can resume
  on another device count, mesh or `config.sharding`.

  Returns None when there is no checkpoint. A checkpoint that cannot be read
  is skipped with a warning naming its directory; if none can be read, raises
  UserError. Nothing on disk is changed.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise UserError(f'config.checkpoint_step={step} is not in {manager.directory} '
                      f'(it has {sorted(steps) or "none"}); pick one of those')
    steps = [step]
  if not steps:
    return None
  arrays = _arrays(template)
  shardings = (jax.tree.map(lambda _: sharding, arrays)
               if isinstance(sharding, jax.sharding.Sharding) else _arrays(sharding))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        arrays, shardings)
  damaged = []
  for candidate in steps:
    try:
      restored = manager.restore(candidate, args=ocp.args.StandardRestore(target))
      jax.block_until_ready(restored)
    except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many kinds.
      where = f'{manager.directory}/{candidate}'
      logging.warning('Checkpoint %s is damaged or incompatible (%s: %s); trying an older one.',
                      where, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
      damaged.append(where)
      continue
    if step_lib.current_step(restored['step']) != candidate:
      damaged.append(f'{manager.directory}/{candidate}')
      logging.warning('Checkpoint %s holds step %d; skipping it.', damaged[-1],
                      step_lib.current_step(restored['step']))
      continue
    if damaged:
      logging.warning('Resuming from the older checkpoint %s/%d; left untouched: %s',
                      manager.directory, candidate, ', '.join(damaged))
    return template.replace(**restored)
  raise UserError(f'no intact checkpoint in {manager.directory} (unreadable: {", ".join(damaged)}); '
                  'move that directory away to start afresh, or point --workdir elsewhere')
