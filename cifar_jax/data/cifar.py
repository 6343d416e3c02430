"""CIFAR-10/100 facts, in one place: classes, split sizes, image size, mean and std,
the crop padding, `normalize` and the epoch length.

No I/O and no framework beyond numpy: the pure step, the models, both input
pipelines and serving all read these, and none of them should pull in tarfile,
sockets or storage clients to do so.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

DATASETS = ('cifar10', 'cifar100')
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}
SPLIT_SIZES = {'train': 50_000, 'test': 10_000}  # Both datasets.
IMAGE_SIZE = 32  # Height and width; RGB.
PAD = 4  # The usual random-crop padding in pixels (`config.crop_padding`).
# Label names in label order (the datasets' own `batches.meta` / `meta` files).
CLASS_NAMES = {
    'cifar10': ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                'truck'),
    'cifar100': tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl
        boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud
        cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl
        hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
        motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
        pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket
        rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
        sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
        turtle wardrobe whale willow_tree wolf woman worm""".split()),
}
MEAN_STD = {  # Per-channel mean and standard deviation of the train split, in [0, 1].
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Split(NamedTuple):
  """A whole split in host memory (CIFAR fits)."""
  images: np.ndarray  # uint8 [N, 32, 32, 3]
  labels: np.ndarray  # int32 [N]


def normalize(images, dataset: str, dtype=np.float32):
  """uint8 (or float 0..255) images -> the normalized images the models see, in `dtype`.

  numpy in, numpy out; a jax array (also a traced one) in, a jax array out: the
  host pipeline, the device pipeline and serving normalize with the very same
  constants."""
  mean, std = (np.asarray(v, dtype) * 255.0 for v in MEAN_STD[dataset])
  return (images.astype(dtype) - mean) / std


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Whole batches per epoch: the last partial batch of an epoch is dropped."""
  return int(num_examples) // int(batch_size)
