"""Trains and evaluates a CIFAR model: `python main.py --config=configs/gpu.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.batch_size=512`. Rerunning
with the same workdir resumes from its latest checkpoint. With a trained
`--workdir`: `--mode=predict --inputs=...` labels image files, `--mode=export
--export_dir=...` writes a serving bundle (jax.export and ONNX) and `--mode=report`
draws the run's plots; these read the run's own config.json (no --config).
"""
import contextlib
import csv
import io
import json
import logging as pylogging
import os
import subprocess
import sys
import tempfile

# Workdir and data I/O on gs:// through gcsfs / google-cloud-storage (cifar_jax/storage.py),
# not TensorFlow's GCS client, unless the environment says otherwise. Before epath is used.
os.environ.setdefault('EPATH_USE_TF', 'false')

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cifar_jax import config_checks, distributed, storage, train, xla_cpu
from cifar_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export', 'report'],
                  'train (resumes from the latest checkpoint); eval: evaluate the latest '
                  '(or --config.checkpoint_step) checkpoint without changing the workdir; '
                  'predict: top-5 labels of --inputs; export: a serving bundle in '
                  '--export_dir; report: the plots of the run in WORKDIR/report.png.')
flags.DEFINE_list('inputs', [], 'predict: image files, folders and globs (PNG/JPEG, any size).')
flags.DEFINE_string('output', None, 'predict: write a CSV here instead of JSON lines on stdout.')
flags.DEFINE_string('checkpoint', 'best', 'predict/export: best, latest or a step number.')
flags.DEFINE_string('export_dir', None, 'export: the bundle directory to write.')
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
flags.mark_flags_as_required(['workdir'])


class _OnlyWarningsFromLibraries(pylogging.Filter):
  """Orbax and TF log every checkpoint detail at INFO; keep their warnings only."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow/', '/etils/')
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  # Before any JAX backend starts: XLA reads XLA_FLAGS once.
  logging.info('XLA:CPU convolutions: %s.', xla_cpu.use_fast_convolutions())
  try:
    distributed.initialize(
        distributed.plan(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id),
        FLAGS.distributed_timeout_s, FLAGS.heartbeat_timeout_s)
    logging.info('%s', distributed.describe())
    if FLAGS.mode == 'predict':
      predict()
      return
    if FLAGS.mode == 'export':
      result = export()
    elif FLAGS.mode == 'report':
      from cifar_jax import report  # pylint: disable=import-outside-toplevel
      result = {'report': report.write_report(FLAGS.workdir)}
    elif FLAGS.config is None:
      raise UserError(f'--mode={FLAGS.mode} needs --config, e.g. --config=configs/gpu.py')
    else:
      logging.info('Config:\n%s', FLAGS.config)
      warning = config_checks.platform_warning(FLAGS.config, jax.default_backend())
      if warning:
        print(f'warning: {warning}', file=sys.stderr, flush=True)
      if FLAGS.mode == 'eval':
        result = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
      else:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('Result: %s', result)
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                 for k, v in sorted(result.items())))


def predict():
  """One JSON line per readable image on stdout (or a CSV in --output); a warning line on
  stderr per unreadable one."""
  from cifar_jax import inference  # pylint: disable=import-outside-toplevel
  paths = inference.expand_inputs(FLAGS.inputs)
  if not paths:
    raise UserError('--inputs names no files; pass image files, folders or globs, e.g. '
                    '--inputs=photos/ or --inputs="photos/*.jpg"')
  good, images, warnings = inference.read_images(paths)
  for line in warnings:
    print(line, file=sys.stderr)
  if not good:
    raise UserError(f'none of the {len(paths)} inputs is a readable PNG/JPEG image')
  config, state, _, source = inference.load_run(FLAGS.workdir, FLAGS.checkpoint)
  logging.info('Predicting %d images with %s.', len(good), source)
  fn = inference.serving_function(inference.serving_model(config, state), config.dataset)
  top5 = inference.top_k(inference.predict(fn, images, config.eval_batch_size),
                         inference.class_names(config.dataset))
  if FLAGS.output:
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    k = len(top5[0])
    writer.writerow(['file'] + [f'{c}{r}' for r in range(1, k + 1)
                                for c in ('label', 'index', 'probability')])
    for path, row in zip(good, top5):
      writer.writerow([path] + [v for p in row for v in (p['label'], p['index'],
                                                            p['probability'])])
    storage.write_whole(FLAGS.output, text.getvalue())
    logging.info('Wrote %s (%d rows).', FLAGS.output, len(good))
  else:
    for path, row in zip(good, top5):
      print(json.dumps({'file': path, 'top5': row}))
  sys.stdout.flush()


def _onnx_python() -> str | None:
  if FLAGS.onnx_python:
    return FLAGS.onnx_python
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel,unused-import
    return sys.executable
  except ImportError:
    return None


def export() -> dict:
  """The serving bundle: model.jax, model.onnx (when an ONNX environment is there), labels."""
  from cifar_jax import inference  # pylint: disable=import-outside-toplevel
  if not FLAGS.export_dir:
    raise UserError('--mode=export needs --export_dir=DIR (the bundle to write)')
  config, state, _, source = inference.load_run(FLAGS.workdir, FLAGS.checkpoint)
  remote = storage.is_remote(FLAGS.export_dir)  # Built locally, then uploaded file by file.
  with (tempfile.TemporaryDirectory(prefix='cifar_jax_bundle_') if remote else
        contextlib.nullcontext(FLAGS.export_dir)) as bundle:
    result = inference.export_bundle(config, state, bundle, source)
    onnx = _convert_to_onnx(bundle)
    if remote:
      storage.copy_files(bundle, FLAGS.export_dir)
  return {'export_dir': FLAGS.export_dir, 'onnx': onnx, 'platforms': result['platforms']}


def _convert_to_onnx(bundle: str) -> str:
  """model.onnx in the local `bundle`, converted in the ONNX environment; 'skipped' without
  one."""
  python = _onnx_python()
  if python is None:
    logging.warning('No model.onnx: jax2onnx is not installed here. Make an environment with '
                    '`pip install -r requirements-onnx.txt` and pass --onnx_python=ITS_PYTHON.')
    return 'skipped'
  root = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  done = subprocess.run([python, '-m', 'cifar_jax.onnx_export', bundle], env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise UserError(f'the ONNX conversion failed ({python}): '
                    f'{(done.stderr.strip().splitlines() or ["no output"])[-1]}')
  return 'model.onnx'


if __name__ == '__main__':
  app.run(main)
