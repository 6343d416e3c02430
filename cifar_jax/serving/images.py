"""Image files for predict: files, folders and globs of PNG/JPEG of any size, local or
gs:// (`storage`), made into CIFAR-sized uint8 arrays as CIFAR's images were made.

Pillow decodes them; no TensorFlow.
"""
from __future__ import annotations

import glob
import io
import os

import numpy as np

from cifar_jax.data.cifar import IMAGE_SIZE
from cifar_jax.runtime import storage


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
