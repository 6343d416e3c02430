"""cifar_jax/serving/ and main.py's predict and export modes: predict on image files, and
the serving bundle (jax.export and ONNX) against the JAX model for every architecture."""
import json
import os
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from helpers import ROOT, main_py, subprocess_env

from flax import nnx

from cifar_jax import create_train_state, models, workdir as workdir_lib
from cifar_jax.data.cifar import CLASS_NAMES, normalize
from cifar_jax.serving import (export as export_lib, images as images_lib, model as model_lib,
                               predict as predict_lib)

# Real CIFAR-10 images for the export checks, when given: a .tar.gz of CIFAR-10 JPEGs.
REAL_JPEGS = os.environ.get('CIFAR_JAX_TEST_JPEGS', '')


def sample_images(n=16) -> np.ndarray:
  """Real CIFAR-10 images when CIFAR_JAX_TEST_JPEGS names a .tar.gz of them (its first n),
  else structured ones (gradients and blocks, not noise)."""
  if REAL_JPEGS and os.path.exists(REAL_JPEGS):
    from PIL import Image
    images = []
    with tarfile.open(REAL_JPEGS, 'r:gz') as tar:
      for member in tar:
        if member.isfile() and member.name.endswith('.jpg'):
          with Image.open(tar.extractfile(member)) as image:
            images.append(np.asarray(image.convert('RGB'), np.uint8))
          if len(images) == n:
            return np.stack(images)
  y, x = np.mgrid[0:32, 0:32]
  rs = np.random.RandomState(0)
  images = []
  for i in range(n):
    base = np.stack([(x * (i + 1) * 3) % 256, (y * 5 + i * 17) % 256, ((x + y) * 4) % 256], -1)
    base[rs.randint(0, 24):, rs.randint(0, 24):] //= 2
    images.append(base.astype(np.uint8))
  return np.stack(images)


# --- predict -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_predict_a_folder_with_a_bad_file_in_it(trained_run, tmp_path):
  from PIL import Image
  folder = tmp_path / 'photos'
  folder.mkdir()
  images = sample_images(3)
  Image.fromarray(images[0]).save(folder / 'a.png')
  Image.fromarray(np.kron(images[1], np.ones((3, 2, 1), np.uint8))).save(folder / 'b.jpg')  # 96x64.
  Image.fromarray(images[2][..., 0], 'L').save(folder / 'c.png')  # Greyscale.
  (folder / 'notes.txt').write_text('not an image')
  result = main_py(f'--workdir={trained_run}', '--mode=predict', f'--inputs={folder}')
  assert result.returncode == 0, result.stderr[-2000:]
  warnings = [l for l in result.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and 'notes.txt' in warnings[0]
  lines = [json.loads(l) for l in result.stdout.splitlines()]
  assert [os.path.basename(l['file']) for l in lines] == ['a.png', 'b.jpg', 'c.png']
  for line in lines:
    top5 = line['top5']
    assert len(top5) == 5 and top5[0]['probability'] >= top5[-1]['probability']
    assert all(p['label'] == CLASS_NAMES['cifar10'][p['index']] for p in top5)
  # The same prediction as the model on the same pixels (a.png is 32x32: no resize).
  config, state, _, _ = workdir_lib.load_state(trained_run, 'best')
  probs = predict_lib.predict(model_lib.serving_function(model_lib.serving_model(config, state),
                                                       'cifar10'), images[:1])
  assert lines[0]['top5'][0]['index'] == int(np.argmax(probs[0]))
  assert lines[0]['top5'][0]['probability'] == pytest.approx(float(probs[0].max()), abs=1e-5)
  csv_path = tmp_path / 'out.csv'
  result = main_py(f'--workdir={trained_run}', '--mode=predict', f'--inputs={folder}/*.png',
                   f'--output={csv_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  rows = csv_path.read_text().splitlines()
  assert rows[0].startswith('file,label1,index1,probability1') and len(rows) == 3


@pytest.mark.e2e
def test_predict_with_nothing_readable_is_one_error_line(trained_run, tmp_path):
  (tmp_path / 'x.jpg').write_text('garbage')
  result = main_py(f'--workdir={trained_run}', '--mode=predict', f'--inputs={tmp_path}/x.jpg')
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'readable' in errors[0] and 'Traceback' not in result.stderr


def test_resize_takes_the_centred_square():
  from PIL import Image
  image = np.zeros((64, 128, 3), np.uint8)
  image[:, 32:96] = 200  # The centred square, bright; the sides dark.
  assert (images_lib.to_cifar_size(Image.fromarray(image)) == 200).all()


# --- the serving bundle, for every architecture ----------------------------------------
# The larger ViTs are vit_tiny's code at other sizes (vit_giant's weights alone are 7 GB).
# One registered name per model class (resnet56 is resnet20's class at another depth, the
# larger ViTs vit_micro's at other sizes): every layer kind the exporters must convert.
EXPORTED = ['tutorial_cnn', 'resnet20', 'resnet18', 'wrn28_10', 'fast_cnn', 'airbench',
            'vit_micro']


def test_every_model_class_is_exported():
  assert {models.model_class(m) for m in EXPORTED} == {models.model_class(m) for m in models.MODELS}


def _with_values(abstract):
  """`abstract` (a train state of ShapeDtypeStructs) with values: each weight matrix or
  kernel N(0, 1/fan_in), norm scales 1, everything else 0 (the noise comes after)."""
  rs = np.random.RandomState(0)

  def value(path, x):
    name = jax.tree_util.keystr(path)
    if 'scale' in name or name.endswith("['var']['value']"):
      return np.ones(x.shape, x.dtype)
    if len(x.shape) >= 2 and 'params' in name:
      fan_in = int(np.prod(x.shape[:-1]))
      return (rs.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)
    return np.zeros(x.shape, x.dtype)
  return jax.tree_util.tree_map_with_path(value, abstract)


@pytest.fixture(scope='session')  # Once per worker: see conftest's xdist groups.
def bundles(tmp_path_factory):
  from configs import default
  root = tmp_path_factory.mktemp('bundles')
  images = sample_images(8)
  for name in EXPORTED:
    config = default.get_config()
    config.update(model=name, ema_decay=0.0)
    # The state's structure only (an XLA:CPU compile of a model's random init takes up to
    # 12 s); its values are drawn here: weights of a trained model's scale, off any init
    # (the ViT head starts at zero), and BatchNorm statistics of real data (one train-mode
    # pass with momentum 0).
    state = _with_values(jax.eval_shape(lambda c=config: create_train_state(c, jax.random.key(0),
                                                                           256)))
    rs = np.random.RandomState(1)
    params = jax.tree.map(lambda p: p + 0.05 * rs.standard_normal(np.shape(p)).astype(np.float32),
                          state.params)
    model = nnx.merge(state.graphdef, params, state.batch_stats, copy=True)
    model.train()
    model.set_attributes(nnx.BatchNorm, momentum=0.0, raise_if_not_found=False)
    nnx.jit(lambda m, x: m(x))(model, normalize(images, 'cifar10'))  # (Eager: 10x slower.)
    state = state.replace(params=params, batch_stats=nnx.state(model, nnx.BatchStat))
    directory = str(root / name)
    # CPU only here (the runtime under test); export mode's test checks all three lower.
    export_lib.export_bundle(config, state, directory, 'test', platforms=('cpu',))
    fn = jax.jit(model_lib.serving_function(model_lib.serving_model(config, state), 'cifar10'))
    np.save(os.path.join(directory, 'images.npy'), images)
    reference = np.asarray(fn(images))
    assert reference.std(axis=0).mean() > 1e-2, name  # Logits that differ between images.
    np.save(os.path.join(directory, 'reference.npy'), reference)
  return {name: str(root / name) for name in EXPORTED}


def _close(got, want) -> float:
  return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.e2e
def test_jax_export_artifact_runs_in_a_fresh_process_without_the_project(bundles, tmp_path):
  # -I: isolated (no PYTHONPATH, no script directory, no user site); cwd outside the repo.
  code = '''
import json, sys, jax, numpy as np
errors = {}
for name, directory in json.loads(sys.argv[1]).items():
  with open(directory + '/model.jax', 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  got = np.asarray(exported.call(np.load(directory + '/images.npy')))
  want = np.load(directory + '/reference.npy')
  errors[name] = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
  assert exported.in_avals[0].dtype == np.uint8 and not isinstance(exported.in_avals[0].shape[0], int)
assert not any(m.startswith(('cifar_jax', 'flax')) for m in sys.modules), 'imported the project'
print(json.dumps(errors))
'''
  result = subprocess.run([sys.executable, '-I', '-c', code, json.dumps(bundles)],
                          cwd=str(tmp_path), env=subprocess_env(1), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(result.stdout.splitlines()[-1])
  print('jax.export artifact vs JAX, max |diff| / max(1, max |logit|):', errors)
  assert set(errors) == set(EXPORTED)
  assert max(errors.values()) <= 1e-4, errors


def _onnx_python():
  python = os.environ.get('CIFAR_JAX_ONNX_PYTHON')
  if python:
    return python
  try:
    import jax2onnx  # pylint: disable=unused-import
    import onnxruntime  # pylint: disable=unused-import
    return sys.executable
  except ImportError:
    return None


@pytest.mark.e2e
def test_onnx_model_matches_the_jax_model(bundles):
  python = _onnx_python()
  if python is None:
    pytest.skip('ONNX half skipped: jax2onnx and onnxruntime are not installed here (they pin '
                'an older orbax-checkpoint); `python -m venv .venv-onnx && .venv-onnx/bin/pip '
                'install -r requirements-onnx.txt`, then CIFAR_JAX_ONNX_PYTHON=.venv-onnx/bin/python')
  code = '''
import json, sys, numpy as np, onnxruntime as ort
from cifar_jax.serving import onnx_export
errors = {}
for name, directory in json.loads(sys.argv[1]).items():
  session = ort.InferenceSession(onnx_export.convert(directory))
  got = session.run(None, {'images': np.load(directory + '/images.npy')})[0]
  want = np.load(directory + '/reference.npy')
  errors[name] = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
print(json.dumps(errors))
'''
  env = dict(subprocess_env(1), PYTHONPATH=ROOT)
  result = subprocess.run([python, '-c', code, json.dumps(bundles)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(result.stdout.splitlines()[-1])
  print('ONNX Runtime vs JAX, max |diff| / max(1, max |logit|):', errors)
  assert set(errors) == set(EXPORTED)
  assert max(errors.values()) <= 1e-4, errors


@pytest.mark.e2e
def test_export_mode_writes_the_bundle(trained_run, tmp_path):
  bundle = tmp_path / 'bundle'
  python = _onnx_python()
  result = main_py(f'--workdir={trained_run}', '--mode=export', f'--export_dir={bundle}',
                   f'--onnx_python={python or ""}')
  assert result.returncode == 0, result.stderr[-3000:]
  names = set(os.listdir(bundle))
  assert {'model.jax', 'labels.json', 'README.txt', 'weights.npz', 'model.json'} <= names
  assert ('model.onnx' in names) == (python is not None)
  assert not [n for n in names if n.endswith(('.data', '.tmp'))]  # One self-contained file.
  assert json.loads((bundle / 'labels.json').read_text())[3] == 'cat'
  assert 'onnxruntime' in (bundle / 'README.txt').read_text()
  assert json.loads((bundle / 'model.json').read_text())['platforms'] == ['cpu', 'cuda', 'tpu']
