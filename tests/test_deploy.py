"""tools/export_deploy.py's IREE module and ONNX model against the JAX packed inference, and
bhvit_jax.predict in-process and in a virtual environment that has no JAX.

The exporters (IREE's compiler, onnx) and both runtimes are in the `test` extra: without them
these tests fail."""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from bhvit_jax import config_lib
from bhvit_jax import convert
from bhvit_jax import data as data_lib
from bhvit_jax import deploy_runtime
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import predict
import test_tools
import programs

REPO = programs.REPO
NUM_IMAGES = 3  # with the IREE module's batch of 2: one full and one padded call
FORMATS = ('iree', 'onnx')


export_deploy = programs.load_tool('export_deploy')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """{'config', 'model', 'variables', 'artifact': {format: path}, 'images': [png paths],
  'root', 'jax_packed_logits'}; the ONNX model's batch is dynamic."""
  root = tmp_path_factory.mktemp('deploy')
  config_path = root / 'tiny.py'
  config_path.write_text(test_tools.TINY_CONFIG)
  config = config_lib.load_config_file(str(config_path))
  model = model_lib.build(config.model)
  variables = test_tools._random_variables(model)  # pylint: disable=protected-access
  checkpoint = root / 'vars.msgpack'
  convert.save_flax_file(variables, checkpoint)
  artifact = {'iree': str(root / 'tiny.vmfb'), 'onnx': str(root / 'tiny.onnx')}
  export_deploy.export(str(config_path), str(checkpoint), 'iree', 'host', 2, artifact['iree'])
  export_deploy.export(str(config_path), str(checkpoint), 'onnx', 'host', None, artifact['onnx'])
  source = data_lib.make_source(config, config.data.eval_split)
  images = []
  for i in range(NUM_IMAGES):
    images.append(str(root / f'digit{i}.png'))
    Image.fromarray(source[i][0]).save(images[-1])
  # The JAX packed model on the eval pipeline's batch of the same images.
  batch = next(iter(data_lib.build_eval_iter(config)))['image'][:NUM_IMAGES]
  arrays = packed.arrays(packed.export(model, variables))
  logits = np.asarray(jax.jit(lambda a, x: packed.apply(model, a, x))(arrays, batch))
  return {'config': config, 'model': model, 'variables': variables, 'artifact': artifact,
          'images': images, 'root': root, 'jax_packed_logits': logits}


@pytest.mark.parametrize('fmt', FORMATS)
def test_artifact_logits_equal_the_jax_packed_model(exported, fmt):
  """Digit files through the runtime's preprocessing vs the eval pipeline's batch in JAX."""
  model = deploy_runtime.Model(exported['artifact'][fmt], threads=1)
  images = np.stack([model.preprocess(deploy_runtime.load_image(p))
                     for p in exported['images']])
  logits = model.predict_logits(images)
  want = exported['jax_packed_logits']
  assert logits.shape == want.shape
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(want, -1))
  meta = model.meta
  assert (meta['image_size'], meta['class_names']) == (32, list('0123456789'))
  assert (meta['runtime'], meta['batch']) == ((fmt, 2) if fmt == 'iree' else (fmt, None))


@pytest.mark.parametrize('fmt', FORMATS)
def test_predict_prints_and_writes_the_top_classes(exported, capsys, fmt):
  out = exported['root'] / f'pred_{fmt}.jsonl'
  predict.main(['--artifact', exported['artifact'][fmt], '--images', *exported['images'],
                '--top', '3', '--out', str(out)])
  records = [json.loads(line) for line in out.read_text().splitlines()]
  model = deploy_runtime.Model(exported['artifact'][fmt])
  logits = model.predict_logits(np.stack([model.preprocess(deploy_runtime.load_image(p))
                                          for p in exported['images']]))
  assert [r['path'] for r in records] == exported['images']
  assert [r['top'][0][0] for r in records] == [str(i) for i in np.argmax(logits, -1)]
  np.testing.assert_array_equal([r['logits'] for r in records], logits)
  assert all(len(r['top']) == 3 for r in records)
  assert len(capsys.readouterr().out.splitlines()) == NUM_IMAGES


def _fails(capsys, fn, argv, match, one_line=True):
  with pytest.raises(SystemExit) as info:
    fn(argv)
  err = capsys.readouterr().err
  assert info.value.code == 2 and err.startswith('error: '), err
  assert match in err.splitlines()[0] and (err.count('\n') == 1 or not one_line), err


def test_bad_inputs_give_one_line_and_no_file(exported, capsys, tmp_path):
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not an image')
  out = tmp_path / 'pred.jsonl'
  _fails(capsys, predict.main, ['--artifact', exported['artifact']['iree'], '--images',
                                exported['images'][0], str(broken), '--out', str(out)],
         'broken.png is not a readable image')
  assert not out.exists() and not pathlib.Path(str(out) + '.tmp').exists()
  # An artifact of another format version.
  other = tmp_path / 'other.vmfb'
  other.write_bytes(pathlib.Path(exported['artifact']['iree']).read_bytes())
  meta = json.loads(pathlib.Path(exported['artifact']['iree'] + '.json').read_text())
  pathlib.Path(str(other) + '.json').write_text(json.dumps({**meta, 'format': 'bhvit-deploy-v0'}))
  _fails(capsys, predict.main, ['--artifact', str(other), '--images', exported['images'][0]],
         "another version of bhvit_jax (format 'bhvit-deploy-v0'")
  damaged = tmp_path / 'damaged.onnx'  # a damaged ONNX model
  damaged.write_bytes(pathlib.Path(exported['artifact']['onnx']).read_bytes()[:1000])
  pathlib.Path(str(damaged) + '.json').write_text(
      pathlib.Path(exported['artifact']['onnx'] + '.json').read_text())
  _fails(capsys, predict.main, ['--artifact', str(damaged), '--images', exported['images'][0]],
         'damaged.onnx is not a loadable ONNX model')
  # Export: an unknown target and a checkpoint of another configuration, nothing written.
  checkpoint = exported['root'] / 'vars.msgpack'
  config = exported['root'] / 'tiny.py'
  target = tmp_path / 'x.vmfb'
  _fails(capsys, export_deploy.main, ['--config', str(config), '--checkpoint', str(checkpoint),
                                      '--target', 'riscv', '--out', str(target)],
         "unknown --target 'riscv'")
  _fails(capsys, export_deploy.main, ['--config', str(config), '--checkpoint', str(checkpoint),
                                      '--format', 'tflite', '--out', str(target)],
         "unknown --format 'tflite'")
  _fails(capsys, export_deploy.main, ['--config', str(REPO / 'configs' / 'demo.py'),
                                      '--checkpoint', str(checkpoint), '--out', str(target)],
         'was it written with another model config', one_line=False)  # + the shape listing
  assert not list(tmp_path.glob('x.vmfb*'))


def test_predict_runs_in_a_virtual_environment_without_jax(exported, tmp_path):
  """numpy + pillow + the two runtimes only (pip may use its cache)."""
  start = time.perf_counter()
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  runtimes = [f'{p}=={importlib.metadata.version(p)}'
              for p in deploy_runtime.RUNTIME_PACKAGES.values()]
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
                  'numpy', 'pillow', *runtimes], check=True)
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  for fmt, artifact in exported['artifact'].items():
    out = tmp_path / f'pred_{fmt}.jsonl'
    run = subprocess.run([python, '-c', 'import importlib.util as u; '
                          'assert u.find_spec("jax") is None and u.find_spec("flax") is None; '
                          'from bhvit_jax import predict; predict.main()',
                          '--artifact', artifact, '--images', *exported['images'],
                          '--out', str(out)], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = predict.predict(artifact, exported['images'])
    assert [r['top'][0] for r in got] == [r['top'][0] for r in want], fmt
    np.testing.assert_array_equal([r['logits'] for r in got], [r['logits'] for r in want])
  print(f'fresh runtime environment + predict: {time.perf_counter() - start:.1f} s')
