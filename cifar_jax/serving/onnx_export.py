"""model.onnx for a serving bundle, with jax2onnx: `python -m cifar_jax.serving.onnx_export BUNDLE`.

jax2onnx pins an older orbax-checkpoint than training needs, so it lives in its own
environment (`requirements-onnx.txt`); this module needs only jax, flax and jax2onnx
from it (no orbax, no TensorFlow, no checkpoint): it rebuilds the model from the
bundle's `model.json` and `weights.npz` (written by `export.export_bundle`) and
converts the same uint8 -> logits function as `model.jax` (`model.serving_function`),
with a symbolic batch.
`main.py --mode=export` runs it in that environment (`--onnx_python`).
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax import models
from cifar_jax.data.cifar import IMAGE_SIZE
from cifar_jax.serving import model as model_lib

OPSET = 23


def build(bundle: str):
  """The bundle's serving function, rebuilt from model.json and weights.npz."""
  with open(os.path.join(bundle, 'model.json'), encoding='utf-8') as f:
    meta = json.load(f)
  abstract = nnx.eval_shape(lambda: models.create_model(
      meta['model'], meta['num_classes'], rngs=nnx.Rngs(0),
      widths=tuple(meta['model_widths'])))
  _, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  tree = {'params': params, 'batch_stats': batch_stats}  # The layout export_bundle saved.
  with np.load(os.path.join(bundle, 'weights.npz')) as weights:
    leaves = [jnp.asarray(weights[jax.tree_util.keystr(p)])
              for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  tree = jax.tree.unflatten(jax.tree.structure(tree), leaves)
  model = model_lib.float32_model(meta['model'], meta['num_classes'], meta['model_widths'],
                                  tree['params'], tree['batch_stats'])
  return model_lib.serving_function(model, meta['dataset'])


def convert(bundle: str) -> str:
  """Writes BUNDLE/model.onnx, one self-contained file (weights inside); returns its path."""
  import jax2onnx  # pylint: disable=import-outside-toplevel
  import onnx  # pylint: disable=import-outside-toplevel
  batch = jax.export.symbolic_shape('batch')[0]
  spec = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
  path = os.path.join(bundle, 'model.onnx')
  proto = jax2onnx.to_onnx(build(bundle), [spec], model_name='cifar_jax', opset=OPSET,
                           input_names=['images'], output_names=['logits'], return_mode='proto')
  # jax2onnx's intermediate shape annotations (some in its internal NCHW layout) are optional
  # and make ONNX Runtime warn at load; the runtimes infer the shapes themselves.
  del proto.graph.value_info[:]
  # Protobuf's 2 GB limit: beyond it the weights go to model.onnx.data beside it.
  external = proto.ByteSize() > 1_900_000_000
  onnx.save_model(proto, path + '.tmp', save_as_external_data=external,
                  location='model.onnx.data')
  os.replace(path + '.tmp', path)
  return path


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m cifar_jax.serving.onnx_export BUNDLE_DIR')
  print(convert(sys.argv[1]))
