"""Using a trained model: load a run's checkpoint, predict on image files, export it.

- `load_run(workdir, checkpoint)`: the run's config (its `config.json`) and the
  train state of its best (default), latest or a given checkpoint, on one device.
- `serving_function(state, dataset)`: uint8 images [N, 32, 32, 3] -> float32
  logits, normalization inside, eval mode, the EMA weights when the run kept them.
  The one function that predict, the jax.export artifact and the ONNX model run.
- `read_images(inputs)`: files, folders and globs of PNG/JPEG of any size, local or
  gs:// (`storage`).
- `predict(...)`: batched and padded like eval (one compile for any count).
- `export_bundle(...)`: a serving bundle (`jax.export` artifact, weights for the
  ONNX conversion in `onnx_export.py`, labels.json, README.txt).

No TensorFlow; Pillow decodes the images.
"""
from __future__ import annotations

import glob
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cifar_jax import device_pipeline, models, storage
from cifar_jax.data_sources import CLASS_NAMES, NUM_CLASSES
from cifar_jax.errors import UserError

IMAGE_SIZE = 32
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
CHECKPOINTS = ('best', 'latest')


# --- a run's model ---------------------------------------------------------------------
# Checkpoints, configs and the train state are imported where used: `onnx_export` imports
# this module in jax2onnx's environment, which has neither ml_collections nor our orbax.
def run_config(workdir: str):
  """The config a run was trained with (`workdir/config.json`), as a ConfigDict."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  path = storage.path(workdir) / 'config.json'
  text = storage.read_text(path)
  if text is None:
    raise UserError(f'{path} does not exist; point --workdir at a training run')
  config = ml_collections.ConfigDict(json.loads(text))
  for field in ('model_widths', 'mesh_shape'):  # JSON lists back to the tuples they were.
    if field in config:
      config[field] = tuple(config[field])
  return config


def load_run(workdir: str, checkpoint: str = 'best'):
  """(config, state on one device, step, description) of `checkpoint`: best | latest | STEP.

  `best` is the best-by-eval-accuracy checkpoint, or the latest one if the run
  has not evaluated yet (said in the log).
  """
  from cifar_jax import checkpointing, step as step_lib  # pylint: disable=import-outside-toplevel
  config = run_config(workdir)
  if checkpoint not in CHECKPOINTS and not str(checkpoint).isdigit():
    raise UserError(f'--checkpoint={checkpoint!r} must be best, latest or a step number')
  best = checkpointing.best_dir(workdir)
  use_best = checkpoint == 'best' and storage.has_step_dirs(best)
  if checkpoint == 'best' and not use_best:
    logging.warning('%s has no best checkpoint (no eval yet); using the latest one.', workdir)
  directory = best if use_best else checkpointing.checkpoints_dir(workdir)
  if not directory.exists():
    raise UserError(f'{directory} does not exist; train first, or point --workdir at a run')
  manager = checkpointing.open_read_only(workdir, directory=directory)
  template = step_lib.create_train_state(config, jax.random.key(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = int(checkpoint) if str(checkpoint).isdigit() else None
  state = checkpointing.restore(manager, template, device, step=wanted)
  manager.close()
  if state is None:
    raise UserError(f'{directory} holds no checkpoint; train first')
  step = int(state.step)
  weights = 'EMA weights' if state.ema_params is not None else 'weights'
  return config, state, step, f'{"best" if use_best else "checkpoint"} {directory}/{step} ({weights})'


def float32_model(name: str, num_classes: int, widths, params, batch_stats) -> nnx.Module:
  """Model `name` with these weights in eval mode, computing in float32 (whatever
  `half_precision` trained it: what ONNX runtimes run), without remat."""
  abstract = nnx.eval_shape(lambda: models.create_model(
      name, num_classes, dtype=jnp.float32, rngs=nnx.Rngs(0), widths=tuple(widths)))
  graphdef = nnx.split(abstract, nnx.Param, nnx.BatchStat)[0]
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  model.eval()
  return model


def serving_model(config, state) -> nnx.Module:
  """The run's model (`float32_model`) with its EMA weights when it kept them: what
  predict and both exported formats run."""
  params = state.ema_params if state.ema_params is not None else state.params
  return float32_model(config.model, NUM_CLASSES[config.dataset],
                       config.get('model_widths', ()), params, state.batch_stats)


def serving_function(model: nnx.Module, dataset: str):
  """uint8 [N, 32, 32, 3] -> float32 logits [N, classes], normalization inside."""
  def logits(images):
    return model(device_pipeline.normalize(images, dataset)).astype(jnp.float32)

  return logits


# --- images ----------------------------------------------------------------------------
def expand_inputs(inputs: list[str]) -> list[str]:
  """Files, folders (their files, sorted, not recursive) and globs -> file paths. gs://
  ones too (a glob there: in the last path component only)."""
  paths = []
  for item in inputs:
    if storage.is_remote(item):
      p = storage.path(item)
      if glob.has_magic(p.name):
        paths += sorted(str(c) for c in p.parent.glob(p.name) if c.is_file())
      elif p.is_dir():
        paths += sorted(str(c) for c in p.iterdir() if c.is_file())
      else:
        paths.append(item)
      continue
    item = os.path.expanduser(item)
    if os.path.isdir(item):
      paths += sorted(os.path.join(item, n) for n in os.listdir(item)
                      if os.path.isfile(os.path.join(item, n)))
    elif glob.has_magic(item):
      paths += sorted(p for p in glob.glob(item) if os.path.isfile(p))
    else:
      paths.append(item)
  return paths


def to_cifar_size(image) -> np.ndarray:
  """A PIL image -> uint8 [32, 32, 3] RGB, as CIFAR's images were made: the largest
  centred square, then resized to 32x32 (area average when shrinking, bicubic when
  enlarging). Transparency is composited on white; greyscale becomes RGB."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if image.mode in ('RGBA', 'LA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    image = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image.alpha_composite(rgba)
  image = image.convert('RGB')
  w, h = image.size
  side = min(w, h)
  image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                      (h - side) // 2 + side))
  if side != IMAGE_SIZE:
    resample = Image.Resampling.BOX if side > IMAGE_SIZE else Image.Resampling.BICUBIC
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), resample)
  return np.asarray(image, np.uint8)


def read_images(paths: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
  """(readable paths, uint8 [N, 32, 32, 3], one warning per unreadable or non-image file)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  good, images, warnings = [], [], []
  for path in paths:
    try:
      source = io.BytesIO(storage.path(path).read_bytes()) if storage.is_remote(path) else path
      with Image.open(source) as image:
        image.load()
        images.append(to_cifar_size(image))
      good.append(path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
      warnings.append(f'warning: skipped {path}: {type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else "unreadable"}')
  array = np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  return good, array, warnings


# --- predict ---------------------------------------------------------------------------
def predict(logits_fn, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Softmax probabilities [N, classes]: batches of `batch_size`, the last one padded (so
  one compiled shape serves any N; the padding is dropped)."""
  compiled = jax.jit(lambda x: jax.nn.softmax(logits_fn(x), axis=-1))
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:],
                                             batch.dtype)]) if len(batch) < batch_size else batch
    out.append(np.asarray(compiled(padded))[:len(batch)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def top_k(probabilities: np.ndarray, names: tuple[str, ...], k: int = 5) -> list[list[dict]]:
  """Per image, its k most probable classes: {'label', 'index', 'probability'}."""
  k = min(k, probabilities.shape[-1])
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [[{'label': names[i], 'index': int(i), 'probability': round(float(p[i]), 6)}
           for i in row] for p, row in zip(probabilities, order)]


def class_names(dataset: str) -> tuple[str, ...]:
  return CLASS_NAMES[dataset]


# --- export ----------------------------------------------------------------------------
EXPORT_PLATFORMS = ('cpu', 'cuda', 'tpu')
BUNDLE_README = """cifar_jax serving bundle: {model} trained on {dataset} ({source}).

Input: uint8 images [N, 32, 32, 3], RGB, 0..255, N any (symbolic batch). Images of another
size: take the largest centred square and resize it to 32x32 (area average when shrinking),
as `python main.py --mode=predict` does. Normalization is inside the model.
Output: float32 logits [N, {classes}]; softmax for probabilities; label names (index order)
in labels.json.

Files:
  model.jax   jax.export artifact (StableHLO, platforms: {platforms}). Needs only `jax`:
                import jax, numpy as np
                with open('model.jax', 'rb') as f:
                  exported = jax.export.deserialize(bytearray(f.read()))
                logits = exported.call(np.zeros((8, 32, 32, 3), np.uint8))
  model.onnx  the same function in ONNX (opset 23). Needs only `onnxruntime`:
                import numpy as np, onnxruntime as ort
                session = ort.InferenceSession('model.onnx')
                name = session.get_inputs()[0].name
                logits = session.run(None, {{name: np.zeros((8, 32, 32, 3), np.uint8)}})[0]
  labels.json       class names in index order
  weights.npz, model.json   the float32 weights and model name (what model.onnx is built from)
"""


def export_bundle(config, state, export_dir: str, source: str,
                  platforms: tuple[str, ...] = EXPORT_PLATFORMS) -> dict:
  """Writes the serving bundle (all but model.onnx: see onnx_export.py) into `export_dir`,
  `model.jax` lowered for `platforms`. Returns {'platforms': [...], 'files': [...]}."""
  storage.makedirs(export_dir)
  model = serving_model(config, state)
  fn = jax.jit(serving_function(model, config.dataset))
  batch = jax.export.symbolic_shape('batch')[0]
  spec = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
  try:
    exported = jax.export.export(fn, platforms=platforms)(spec)
  except Exception as e:  # pylint: disable=broad-except  # A platform this jaxlib cannot lower.
    logging.warning('Lowering for %s failed (%s); exporting for %s only.', platforms,
                    str(e).splitlines()[0][:200], jax.default_backend())
    exported = jax.export.export(fn, platforms=(jax.default_backend(),))(spec)
  files = {}
  files['model.jax'] = bytes(exported.serialize())
  names = list(class_names(config.dataset))
  files['labels.json'] = (json.dumps(names, indent=1) + '\n').encode()
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path({'params': params, 'batch_stats': batch_stats})}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files['weights.npz'] = buffer.getvalue()
  files['model.json'] = (json.dumps({
      'model': config.model, 'dataset': config.dataset,
      'model_widths': list(config.get('model_widths', ())), 'num_classes': len(names),
      'source': source, 'platforms': list(exported.platforms)}, indent=1) + '\n').encode()
  files['README.txt'] = BUNDLE_README.format(
      model=config.model, dataset=config.dataset, source=source, classes=len(names),
      platforms=', '.join(exported.platforms)).encode()
  for name, data in files.items():
    storage.write_whole(storage.path(export_dir) / name, data)
  return {'platforms': list(exported.platforms), 'files': sorted(files)}
