"""Config validation: every mistake a user can make, caught before any compile.

Each problem raises `UserError` with one line naming the field and the fix.
"""
from __future__ import annotations

import importlib.metadata
import json
import os

import jax

from cifar_jax import models, optimizers, parallel, population
from cifar_jax.data import cifar, sources
from cifar_jax.errors import UserError
from cifar_jax.runtime import storage

INPUT_PIPELINES = ('host', 'device')
PAD_MODES = ('zeros', 'reflect')
FLIPS = ('random', 'alternating', 'none')
TTA_LEVELS = (0, 1, 2)
REMATS = ('none', 'block')
# config.platform: where a config is meant to run ('' = anywhere; 'accelerator' = GPU or TPU).
PLATFORMS = ('', 'gpu', 'tpu', 'accelerator')
_INSTALL = {
    'gpu': 'pip install -r requirements.txt -e ".[cuda12]" (".[cuda13]" with a CUDA 13 driver)',
    'tpu': 'pip install -r requirements.txt -e ".[tpu]" (or ./tpu_setup.sh install)',
}
_PLUGINS = {'gpu': ('jax-cuda12-plugin', 'jax-cuda13-plugin'), 'tpu': ('libtpu',)}


def _choice(config, field, choices):
  value = config.get(field)
  if value not in choices:
    raise UserError(f'config.{field}={value!r} is unknown; use one of: {", ".join(map(str, choices))} '
                    f'(e.g. --config.{field}={choices[0]})')


def _positive(config, field, allow_zero=False):
  value = config.get(field)
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    raise UserError(f'config.{field}={value!r} must be a number {bound}; set --config.{field}')


def validate(config, num_devices: int, process_count: int = 1, data: bool = True) -> None:
  """Raises UserError for the first problem in `config` for `num_devices` devices.
  `data=False` (`--mode=compile`, which reads no data): not whether the data and the
  libraries that read it are here."""
  _check_choices(config)
  _check_numbers(config)
  if data:
    _check_processes_and_tensorflow(config, process_count)
  profile_window(config)  # Raises UserError on a malformed window.
  _check_batch(config, num_devices, process_count)
  _check_population(config, num_devices)
  if data:
    _check_data(config)


def _check_choices(config) -> None:
  """Every enumerated field, and what the model supports."""
  _choice(config, 'model', sorted(models.MODELS))
  _choice(config, 'dataset', cifar.DATASETS)
  _choice(config, 'data_source', sources.SOURCES)
  _choice(config, 'input_pipeline', INPUT_PIPELINES)
  _choice(config, 'parallelism', tuple(parallel.BACKENDS))
  _choice(config, 'optimizer', optimizers.OPTIMIZERS)
  _choice(config, 'lr_schedule', optimizers.SCHEDULES)
  _choice(config, 'lr_units', optimizers.LR_UNITS)
  _choice(config, 'weight_decay_scope', optimizers.WEIGHT_DECAY_SCOPES)
  _choice(config, 'crop_pad_mode', PAD_MODES)
  _choice(config, 'flip', FLIPS)
  _choice(config, 'tta', TTA_LEVELS)
  _choice(config, 'sharding', parallel.SHARDINGS + ('auto',))
  _choice(config, 'remat', REMATS)
  _choice(config, 'platform', PLATFORMS)
  if config.remat == 'block' and not models.has_blocks(config.model):
    raise UserError(f'config.remat=block but model {config.model} has no blocks to '
                    'rematerialize; use --config.remat=none')
  if config.lr_units == 'per_1024_examples' and config.optimizer != 'sgd':
    raise UserError(f'config.lr_units=per_1024_examples is defined for sgd only, not '
                    f'{config.optimizer}; use --config.lr_units=batch256 or --config.optimizer=sgd')
  if config.model_widths:
    widths = tuple(config.model_widths)
    if not models.takes_widths(config.model):
      choices = ', '.join(n for n in sorted(models.MODELS) if models.takes_widths(n))
      raise UserError(f'config.model_widths={widths} but model {config.model} has fixed widths; '
                      f'set --config.model_widths="()" or use one of {choices}')
    if not all(isinstance(w, int) and w > 0 for w in widths):
      raise UserError(f'config.model_widths={widths} must be positive integers, e.g. '
                      '--config.model_widths="(64, 256, 256)"')


def _check_numbers(config) -> None:
  if not 0 <= config.crop_padding <= 31 or int(config.crop_padding) != config.crop_padding:
    raise UserError(f'config.crop_padding={config.crop_padding!r} must be an integer in 0..31')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps', 'checkpoint_max_to_keep', 'learning_rate',
                'steps_per_dispatch'):
    _positive(config, field)
  for field in ('warmup_epochs', 'weight_decay', 'momentum', 'cutout', 'num_synthetic_examples',
                'bn_bias_lr_multiplier', 'whiten_bias_epochs', 'lookahead_every'):
    _positive(config, field, allow_zero=True)
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise UserError('config.num_epochs and config.num_train_steps are both <= 0; '
                    'set --config.num_epochs=N or --config.num_train_steps=N')
  for field in ('ema_decay', 'label_smoothing', 'lookahead_decay', 'lr_end_fraction'):
    if not 0.0 <= config.get(field) < 1.0:
      raise UserError(f'config.{field}={config.get(field)!r} must be in [0, 1); '
                      f'set --config.{field}=0 to turn it off')


def _check_processes_and_tensorflow(config, process_count: int) -> None:
  if config.parallelism == 'pmap' and process_count > 1:
    raise UserError(f'config.parallelism=pmap runs in one process only, but this job has '
                    f'{process_count}; use --config.parallelism=shard_map (or jit)')
  # TensorFlow only feeds the host pipeline and the tfds source; without it, say so now.
  if config.input_pipeline == 'host':
    try:
      sources.import_tensorflow()
    except ImportError as e:
      raise UserError(f'config.input_pipeline=host needs TensorFlow ({e}); install it '
                      '(pip install -r requirements.txt) or use --config.input_pipeline=device') \
          from None
  if config.data_source == 'tfds':
    try:
      import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
    except ImportError as e:
      raise UserError(f'config.data_source=tfds needs TensorFlow Datasets ({e}); install it '
                      '(pip install -r requirements.txt) or use --config.data_source=archive '
                      'with --config.data_dir=<folder with the CIFAR .tar.gz>') from None


def _check_batch(config, num_devices: int, process_count: int) -> None:
  """The global batch splits over the data axis (and its micro-batches) and the processes."""
  data = _check_mesh(config, num_devices, process_count)
  micro = config.get('micro_batches')
  if not isinstance(micro, int) or micro < 1:
    raise UserError(f'config.micro_batches={micro!r} must be an integer >= 1')
  for field in ('batch_size',):  # eval_batch_size is rounded up to fit (eval pads anyway).
    value = config.get(field)
    if int(value) != value:
      raise UserError(f'config.{field}={value!r} must be an integer')
    where = (f'the {num_devices} devices' if data == num_devices
             else f'the data axis of mesh_shape={tuple(config.mesh_shape)} ({data})')
    if value % (data * micro):
      unit = data * micro
      fix = max(unit, value // unit * unit)
      split = f'{micro} micro-batches x ' if micro > 1 else ''
      raise UserError(f'config.{field}={value} is not divisible by {split}{where}; '
                      f'use a multiple of {unit}, e.g. --config.{field}={fix}')
    if value % process_count:
      raise UserError(f'config.{field}={value} is not divisible by the {process_count} processes')


def _check_population(config, num_devices: int) -> None:
  """population, population_sweep and population_sharding (`cifar_jax.population`)."""
  n = config.get('population', 1)
  if not isinstance(n, int) or n < 1:
    raise UserError(f'config.population={n!r} must be an integer >= 1 (the number of models '
                    'trained together); e.g. --config.population=4')
  _choice(config, 'population_sharding', population.SHARDINGS)
  if config.population_sweep and n == 1:
    raise UserError(f'config.population_sweep={config.population_sweep!r} needs a population; '
                    'set --config.population=N with one value per member')
  try:
    sweep = population.parse_sweep(config.population_sweep, n)
  except ValueError as e:
    raise UserError(f'config.population_sweep={config.population_sweep!r}: {e}; e.g. '
                    f"--config.population_sweep='learning_rate={','.join(['0.1'] * n)}'") \
        from None
  for name, values in sweep.items():
    bad = [v for v in values if not (0 <= v < 1 if name == 'label_smoothing' else
                                     (v > 0 if name == 'learning_rate' else v >= 0))]
    if bad:
      raise UserError(f'config.population_sweep: {name}={bad[0]!r} is out of range (as '
                      f'config.{name})')
  if n > 1 and config.sharding != 'replicated':
    raise UserError(f'config.population={n} with sharding={config.sharding}: a population '
                    'shards members, not layers; use --config.sharding=replicated (and '
                    '--config.population_sharding=members to split the members over devices)')
  if config.population_sharding == 'members' and n > 1:
    data, model = parallel.axis_sizes(tuple(config.mesh_shape), num_devices)
    if config.input_pipeline != 'device':
      raise UserError('config.population_sharding=members makes each device its members\' '
                      'batches on the device; use --config.input_pipeline=device')
    if config.parallelism != 'jit' or model != 1 or n % data:
      fix = -(-n // data) * data
      raise UserError(f'config.population_sharding=members splits the {n} members over the '
                      f'data axis ({data} devices) under parallelism=jit with a model axis of '
                      f'1; have parallelism=jit, mesh_shape=(-1, 1) and a population that '
                      f'{data} divides (e.g. --config.population={fix}), or use '
                      '--config.population_sharding=replicated')


def _check_data(config) -> None:
  if config.data_source == 'archive':
    if not config.data_dir:
      raise UserError('config.data_dir is empty but data_source=archive needs it; '
                      'set --config.data_dir=<folder holding cifar-10-binary.tar.gz or '
                      'cifar-10-python.tar.gz or their extracted folder>')
    if not storage.path(config.data_dir).exists():  # Local or gs://.
      raise UserError(f'config.data_dir={config.data_dir!r} does not exist; point '
                      '--config.data_dir at the folder holding the CIFAR archive')
  if config.data_source == 'synthetic' and config.num_synthetic_examples and \
      config.num_synthetic_examples < config.batch_size:
    raise UserError(f'config.num_synthetic_examples={config.num_synthetic_examples} is smaller '
                    f'than batch_size={config.batch_size}; raise it or set it to 0')


def _installed(distribution: str) -> bool:
  try:
    importlib.metadata.version(distribution)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def platform_warning(config, found: str, installed=_installed) -> str | None:
  """One line when `config.platform` asks for a GPU or TPU and JAX's backend is `found`
  instead (a GPU config on a CPU-only jaxlib would otherwise train on the CPU without a word);
  None when the platform is the intended one."""
  wanted = str(config.get('platform') or '')
  targets = ('gpu', 'tpu') if wanted == 'accelerator' else (wanted,) if wanted else ()
  if not targets or found in targets or not set(targets) <= set(_INSTALL):  # validate() says.
    return None
  what = ' or '.join(t.upper() for t in targets)
  plugins = [p for t in targets for p in _PLUGINS[t] if installed(p)]
  if plugins:
    why = (f'{", ".join(plugins)} is installed, but its devices did not start (JAX logged why '
           'above: driver, CUDA_VISIBLE_DEVICES, or another process holding them)')
  else:
    why = 'install JAX for it: ' + '; or '.join(_INSTALL[t] for t in targets)
  chosen = os.environ.get('JAX_PLATFORMS', '')
  chosen = f' (JAX_PLATFORMS={chosen})' if chosen else ''
  return (f'config.platform={wanted} wants a {what}, but JAX {jax.__version__} runs on '
          f'{found}{chosen}, so this trains on {found}; {why}. '
          f"--config.platform='' silences this")


def profile_window(config) -> tuple[int, int] | None:
  """`config.profile_steps` "A:B" as (A, B): trace the steps after A up to B; None if off."""
  text = str(config.profile_steps or '').strip()
  if not text:
    return None
  try:
    start, stop = (int(v) for v in text.split(':'))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise UserError(f'config.profile_steps={text!r} must be "A:B" with 0 <= A < B (steps A+1..B '
                    'are traced), e.g. --config.profile_steps=100:110')
  return start, stop


def _check_mesh(config, num_devices: int, process_count: int) -> int:
  """Checks mesh_shape and sharding against the devices and backend; returns the data
  axis size (what the batch is split over)."""
  shape = tuple(config.get('mesh_shape'))
  try:
    data, model = parallel.axis_sizes(shape, num_devices)
  except (ValueError, TypeError) as e:
    raise UserError(f'config.mesh_shape={shape}: {e}; e.g. --config.mesh_shape="(-1, 1)"') \
        from None
  if config.parallelism != 'jit' and (model != 1 or config.sharding != 'replicated'):
    raise UserError(f'config.parallelism={config.parallelism} replicates the state over the '
                    f'devices, but sharding={config.sharding}, mesh_shape={shape}; use '
                    '--config.parallelism=jit to shard it')
  per_process = num_devices // process_count
  if per_process % model:
    raise UserError(f'config.mesh_shape={shape}: a model axis of {model} does not divide the '
                    f'{per_process} devices of each process, so its groups would span hosts; '
                    f'use a model axis that divides {per_process}')
  return data


# Fields that may change between a run and its resume: they do not alter the
# trajectory (logging/eval/checkpoint cadence, data location, device layout) or
# are deliberate extensions (more epochs or steps).
RESUME_SAFE_FIELDS = frozenset({
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'checkpoint_max_to_keep',
    'checkpoint_step', 'num_epochs', 'num_train_steps', 'data_dir', 'eval_batch_size',
    'parallelism', 'steps_per_dispatch', 'compilation_cache_dir', 'tta', 'tta_every_eval',
    'mesh_shape', 'sharding', 'remat', 'profile_steps', 'report', 'platform',
    'population_sharding',
})


def check_resume(saved: dict, config, allow_change: bool = False) -> list[str]:
  """Compares the workdir's saved config with `config` before resuming.

  Returns the changed safe fields (for logging). Raises UserError listing the
  changed trajectory fields unless `allow_change`.
  """
  # Both as config.json holds them (JSON has no tuples: a tuple field reads back as a list).
  saved = json.loads(json.dumps(saved))
  current = json.loads(config.to_json_best_effort())
  changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  risky = [k for k in changed if k not in RESUME_SAFE_FIELDS]
  if risky and not allow_change:
    diffs = ', '.join(f'{k} {saved.get(k)!r} -> {current.get(k)!r}' for k in risky)
    raise UserError(f'the config changes fields that alter the training trajectory since this '
                    f'workdir was trained: {diffs}; rerun with the original values, use a new '
                    '--workdir, or pass --allow_config_change to resume anyway')
  return changed
