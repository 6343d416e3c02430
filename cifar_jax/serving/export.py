"""`--mode=export`: a serving bundle of a trained run.

`model.jax` (a `jax.export` artifact with a symbolic batch), `labels.json`, the
float32 weights and `model.json` (what `onnx_export` rebuilds the model from),
`README.txt`; then `model.onnx`, converted by `onnx_export` in an environment
with jax2onnx (`requirements-onnx.txt`; its pins clash with training's Orbax).
A gs:// bundle is built in a local temporary directory, then uploaded.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cifar_jax import workdir as workdir_lib
from cifar_jax.data.cifar import CLASS_NAMES, IMAGE_SIZE
from cifar_jax.errors import UserError
from cifar_jax.runtime import storage
from cifar_jax.serving import model as model_lib

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
  ensemble = bool(state.step.ndim)  # A population's stacked state: export its ensemble.
  if ensemble:
    members = model_lib.serving_models(config, state)
    fn = jax.jit(model_lib.ensemble_function(members, config.dataset))
  else:
    model = model_lib.serving_model(config, state)
    fn = jax.jit(model_lib.serving_function(model, config.dataset))
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
  names = list(CLASS_NAMES[config.dataset])
  files['labels.json'] = (json.dumps(names, indent=1) + '\n').encode()
  if ensemble:  # model.jax alone: onnx_export rebuilds one model from weights.npz.
    files['model.json'] = (json.dumps({
        'model': config.model, 'dataset': config.dataset, 'ensemble_members': len(members),
        'num_classes': len(names), 'source': source, 'platforms': list(exported.platforms)},
                                      indent=1) + '\n').encode()
    for name, data in files.items():
      storage.write_whole(storage.path(export_dir) / name, data)
    return {'platforms': list(exported.platforms), 'files': sorted(files), 'ensemble': True}
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path({'params': params, 'batch_stats': batch_stats})}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files['weights.npz'] = buffer.getvalue()
  files['model.json'] = (json.dumps({
      'model': config.model, 'dataset': config.dataset,
      'model_widths': list(config.model_widths), 'num_classes': len(names),
      'source': source, 'platforms': list(exported.platforms)}, indent=1) + '\n').encode()
  files['README.txt'] = BUNDLE_README.format(
      model=config.model, dataset=config.dataset, source=source, classes=len(names),
      platforms=', '.join(exported.platforms)).encode()
  for name, data in files.items():
    storage.write_whole(storage.path(export_dir) / name, data)
  return {'platforms': list(exported.platforms), 'files': sorted(files)}


def export_run(workdir: str, export_dir: str, checkpoint: str = 'best',
               onnx_python: str = '', member: str = '') -> dict:
  """The serving bundle of `checkpoint` of the run in `workdir`, written to `export_dir`.
  A population's: one function averaging its members' probabilities (model.jax; no
  model.onnx), or member `member` as a solo run's bundle."""
  if not export_dir:
    raise UserError('--mode=export needs --export_dir=DIR (the bundle to write)')
  config, state, _, source = workdir_lib.load_state(workdir, checkpoint, member)
  remote = storage.is_remote(export_dir)  # Built locally, then uploaded file by file.
  with (tempfile.TemporaryDirectory(prefix='cifar_jax_bundle_') if remote else
        contextlib.nullcontext(export_dir)) as bundle:
    result = export_bundle(config, state, bundle, source)
    if result.get('ensemble'):
      logging.warning('No model.onnx for an ensemble (the ONNX conversion rebuilds one model); '
                      'model.jax averages the members. For ONNX export one: --member=I.')
      onnx = 'skipped'
    else:
      onnx = convert_to_onnx(bundle, onnx_python)
    if remote:
      storage.copy_files(bundle, export_dir)
  return {'export_dir': export_dir, 'onnx': onnx, 'platforms': result['platforms']}


def _onnx_python(requested: str) -> str | None:
  if requested:
    return requested
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel,unused-import
    return sys.executable
  except ImportError:
    return None


def convert_to_onnx(bundle: str, onnx_python: str = '') -> str:
  """model.onnx in the local `bundle`, converted by `python -m cifar_jax.serving.onnx_export`
  in the ONNX environment (`onnx_python`; default: this one if it has jax2onnx); 'skipped'
  without one."""
  python = _onnx_python(onnx_python)
  if python is None:
    logging.warning('No model.onnx: jax2onnx is not installed here. Make an environment with '
                    '`pip install -r requirements-onnx.txt` and pass --onnx_python=ITS_PYTHON.')
    return 'skipped'
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  done = subprocess.run([python, '-m', 'cifar_jax.serving.onnx_export', bundle], env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise UserError(f'the ONNX conversion failed ({python}): '
                    f'{(done.stderr.strip().splitlines() or ["no output"])[-1]}')
  return 'model.onnx'
