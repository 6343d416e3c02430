"""Trains and evaluates a CIFAR model: `python main.py --config=configs/gpu.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.batch_size=512`. Rerunning
with the same workdir resumes from its latest checkpoint. With a trained
`--workdir`: `--mode=predict --inputs=...` labels image files, `--mode=export
--export_dir=...` writes a serving bundle (jax.export and ONNX) and `--mode=report`
draws the run's plots; these read the run's own config.json (no --config).
"""
import logging as pylogging
import os
import re
import sys

# Workdir and data I/O on gs:// through gcsfs / google-cloud-storage (cifar_jax/runtime/),
# not TensorFlow's GCS client, unless the environment says otherwise. Before epath is used.
os.environ.setdefault('EPATH_USE_TF', 'false')

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cifar_jax import config_checks, train
from cifar_jax.errors import ResourceError, UserError
from cifar_jax.runtime import distributed, faults, lease, xla_cpu

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export', 'report', 'compile'],
                  'train (resumes from the latest checkpoint); eval: evaluate the latest '
                  '(or --config.checkpoint_step) checkpoint without changing the workdir; '
                  'predict: top-5 labels of --inputs; export: a serving bundle in '
                  '--export_dir; report: the plots of the run in WORKDIR/report.png; '
                  'compile: compile the run for --topology with the TPU compiler and write '
                  'WORKDIR/compile.json (memory per chip, FLOPs, a step-time estimate).')
flags.DEFINE_string('topology', None, 'compile: the TPU slice to compile for, GENERATION:SHAPE, '
                    'e.g. v5e:2x4, v5e:4x4 (2 hosts), v4:2x2x2, v5p:2x2x2, v6e:2x4.')
flags.DEFINE_list('inputs', [], 'predict: image files, folders and globs (PNG/JPEG, any size).')
flags.DEFINE_string('output', None, 'predict: write a CSV here instead of JSON lines on stdout.')
flags.DEFINE_string('checkpoint', 'best', 'predict/export: best, latest or a step number.')
flags.DEFINE_string('export_dir', None, 'export: the bundle directory to write.')
flags.DEFINE_string('member', '', 'A population\'s run (config.population > 1): eval, predict '
                    'and export of member I (--member=I) or of the ensemble (--member=ensemble, '
                    'the default of predict/export; eval reports every member and the ensemble).')
flags.DEFINE_string('onnx_python', os.environ.get('CIFAR_JAX_ONNX_PYTHON', ''),
                    'export: the Python of an environment with requirements-onnx.txt, for '
                    'model.onnx (or CIFAR_JAX_ONNX_PYTHON; default: this one if it has jax2onnx).')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume even though trajectory-changing config fields differ from the '
                  "workdir's config.json.")
# Multi-process runs (see cifar_jax/distributed.py); TPU VMs, SLURM and MPI need none of these.
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0, for a multi-process run (or JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None,
                     'Number of processes (or JAX_NUM_PROCESSES); 1 skips cluster detection.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or JAX_PROCESS_ID).')
flags.DEFINE_integer('distributed_timeout_s', 300,
                     'Seconds to wait for every process to join at start-up.')
flags.DEFINE_integer('heartbeat_timeout_s', 100,
                     'A process silent this long is declared dead and every process stops.')
flags.DEFINE_float('lease_timeout_s', lease.DEFAULT_TIMEOUT_S,
                   'A gs:// workdir lease whose heartbeat is this old belongs to a run that '
                   'is gone, and is taken over (local leases need no timeout).')
flags.DEFINE_bool('debug', False, 'Show the traceback behind a one-line error message, and '
                  "the libraries' own error logs in full.")
flags.mark_flags_as_required(['workdir'])


class _OnlyWarningsFromLibraries(pylogging.Filter):
  """Orbax and TF log every checkpoint detail at INFO; keep their warnings and errors only,
  and those in one line: an error they log with a traceback (Orbax's background save
  threads do, several times per failure) also reaches the main thread, where it becomes
  our `error:` line or, if it is a bug, keeps its traceback. --debug keeps theirs."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow/', '/etils/')
    if not any(n in record.pathname for n in noisy):
      return True
    if record.levelno < pylogging.WARNING:
      return False
    if record.exc_info and not FLAGS.debug:
      record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
      record.exc_info = record.exc_text = None
    return True


def _quiet_closed_event_loops(unraisable) -> None:
  """Once Orbax's asynchronous save has failed it closes its event loop while TensorStore
  writes are still in flight; each of those then reports "Event loop is closed" as an
  unraisable exception: dozens of tracebacks after a disk-full, saying nothing that the
  `error:` line does not. Every other unraisable exception is printed as ever."""
  value = unraisable.exc_value
  if (not FLAGS.debug and isinstance(value, RuntimeError)
      and str(value) == 'Event loop is closed'):
    return
  sys.__unraisablehook__(unraisable)


def _fail(problem: str, status: int) -> None:
  """Ends the process with the one `error:` line."""
  print(f'error: {problem}', file=sys.stderr, flush=True)
  if status == ResourceError.exit_status:
    # A storage fault can leave Orbax's background threads still failing; an interpreter
    # shutdown would print their tracebacks. Everything of ours is closed by now.
    logging.flush()
    sys.stdout.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake in `--config` or its overrides (an unknown field, a
  value of the wrong type, a config file that cannot be loaded) as one `error:` line and
  exit status 2 instead of tracebacks; --help and --helpfull work as ever."""
  try:
    remaining = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get('model')  # A config file that could not be loaded raises here.
    return remaining
  except flags.Error as e:  # A value of the wrong type, an unknown flag.
    problem = str(e).strip().splitlines()[0]
  except (OSError, SyntaxError) as e:  # The config file.
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
    problem = f'--config cannot be loaded: {lines[-1] if lines else type(cause).__name__}'
  except AttributeError as e:  # ml_collections: an unknown field, with its own suggestion.
    text = str(e).encode().decode('unicode_escape')
    field = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean "(\w+)"', text)
    problem = (f'config has no field {field.group(1) if field else text}'
               + (f'; did you mean {guess.group(1)}?' if guess else ''))
  print(f'error: {problem} (the fields and their meanings: configs/default.py)',
        file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  sys.unraisablehook = _quiet_closed_event_loops
  if FLAGS.mode == 'compile' and not os.environ.get('JAX_PLATFORMS'):
    # A compile for --topology never runs on this machine's own devices: on a TPU VM its
    # chips stay free for a training run beside it (and libtpu is shared: cifar_jax/aot.py).
    jax.config.update('jax_platforms', 'cpu')
  # Before any JAX backend starts: XLA reads XLA_FLAGS once.
  logging.info('XLA:CPU convolutions: %s.', xla_cpu.use_fast_convolutions())
  try:
    distributed.initialize(
        distributed.plan(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id),
        FLAGS.distributed_timeout_s, FLAGS.heartbeat_timeout_s)
    logging.info('%s', distributed.describe())
    if FLAGS.mode == 'predict':
      from cifar_jax.serving import predict  # pylint: disable=import-outside-toplevel
      predict.predict_files(FLAGS.workdir, FLAGS.inputs, FLAGS.checkpoint, FLAGS.output,
                            FLAGS.member)
      return
    if FLAGS.mode == 'export':
      from cifar_jax.serving import export  # pylint: disable=import-outside-toplevel
      result = export.export_run(FLAGS.workdir, FLAGS.export_dir, FLAGS.checkpoint,
                                 FLAGS.onnx_python, FLAGS.member)
    elif FLAGS.mode == 'report':
      from cifar_jax import report  # pylint: disable=import-outside-toplevel
      result = {'report': report.write_report(FLAGS.workdir)}
    elif FLAGS.config is None:
      raise UserError(f'--mode={FLAGS.mode} needs --config, e.g. --config=configs/gpu.py')
    else:
      logging.info('Config:\n%s', FLAGS.config)
      warning = (None if FLAGS.mode == 'compile' else
                 config_checks.platform_warning(FLAGS.config, jax.default_backend()))
      if warning:
        print(f'warning: {warning}', file=sys.stderr, flush=True)
      if FLAGS.mode == 'compile':
        from cifar_jax import aot, layout_search  # pylint: disable=import-outside-toplevel
        if not FLAGS.topology:
          raise UserError('--mode=compile needs --topology, e.g. --topology=v5e:2x4')
        compiled = aot.compile_run(FLAGS.config, FLAGS.topology, FLAGS.workdir,
                                   choose=layout_search.choose)
        print(aot.table(compiled))
        result = aot.summary(compiled)
      elif FLAGS.mode == 'eval':
        result = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.member)
      else:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change,
                                          lease_timeout_s=FLAGS.lease_timeout_s)
  except UserError as e:
    if FLAGS.debug:
      raise
    _fail(str(e), e.exit_status)
  except Exception as e:  # pylint: disable=broad-except
    fault = faults.find(e)  # No space, no permission, a path of the wrong kind: one line.
    if fault is None or FLAGS.debug:
      raise
    _fail(faults.describe(fault, f'--mode={FLAGS.mode}'), ResourceError.exit_status)
  logging.info('Result: %s', result)
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else
                 f'{k}=[{",".join(f"{x:.4f}" for x in v)}]'
                 if isinstance(v, list) and all(isinstance(x, float) for x in v) else f'{k}={v}'
                 for k, v in sorted(result.items())))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
