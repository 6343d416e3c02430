"""`--mode=predict`: the top-5 classes of image files, as JSON lines or a CSV.

Batched and padded like eval, so one compile serves any number of images.
"""
from __future__ import annotations

import csv
import io
import json
import sys

import jax
import numpy as np
from absl import logging

from cifar_jax import workdir as workdir_lib
from cifar_jax.data import cifar
from cifar_jax.errors import UserError
from cifar_jax.runtime import storage
from cifar_jax.serving import images as images_lib, model as model_lib


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


def predict_files(workdir: str, inputs: list[str], checkpoint: str = 'best',
                  output: str | None = None, member: str = '') -> None:
  """One JSON line per readable image on stdout (or a CSV in `output`); a warning line on
  stderr per unreadable one. A population's run: its ensemble, or `member` i."""
  paths = images_lib.expand_inputs(inputs)
  if not paths:
    raise UserError('--inputs names no files; pass image files, folders or globs, e.g. '
                    '--inputs=photos/ or --inputs="photos/*.jpg"')
  good, images, warnings = images_lib.read_images(paths)
  for line in warnings:
    print(line, file=sys.stderr)
  if not good:
    raise UserError(f'none of the {len(paths)} inputs is a readable PNG/JPEG image')
  config, state, _, source = workdir_lib.load_state(workdir, checkpoint, member)
  logging.info('Predicting %d images with %s.', len(good), source)
  fn = (model_lib.ensemble_function(model_lib.serving_models(config, state), config.dataset)
        if state.step.ndim else
        model_lib.serving_function(model_lib.serving_model(config, state), config.dataset))
  top5 = top_k(predict(fn, images, config.eval_batch_size), cifar.CLASS_NAMES[config.dataset])
  if output:
    storage.write_whole(output, _csv(good, top5))
    logging.info('Wrote %s (%d rows).', output, len(good))
  else:
    for path, row in zip(good, top5):
      print(json.dumps({'file': path, 'top5': row}))
  sys.stdout.flush()


def _csv(paths: list[str], top5: list[list[dict]]) -> str:
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  k = len(top5[0])
  writer.writerow(['file'] + [f'{c}{r}' for r in range(1, k + 1)
                              for c in ('label', 'index', 'probability')])
  for path, row in zip(paths, top5):
    writer.writerow([path] + [v for p in row for v in (p['label'], p['index'], p['probability'])])
  return text.getvalue()
