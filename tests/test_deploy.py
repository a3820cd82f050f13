"""tools/export_deploy.py's IREE module and ONNX model against the JAX float and packed models,
and bhvit_jax.predict in-process and in a virtual environment that has no JAX.

The models are the tiny geometry of test_tools.TINY_CONFIG with gsb off and on, trained for a
few dozen steps (tests/data/deploy_gsb*.msgpack, written by tests/make_deploy_fixtures.py), so
BatchNorm statistics and quantizer calibration are real and held-out top-1 is far above chance.

The exporters (IREE's compiler, onnx) and both runtimes are in the `test` extra: without them
these tests fail."""
import importlib.metadata
import json
import os
import pathlib
import stat
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import deploy_runtime
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import predict
from bhvit_jax import reference
import make_deploy_fixtures
import programs

REPO = programs.REPO
NUM_IMAGES = 64  # held-out digits: the eval pipeline's first batch
# Each IREE function costs compile time: the gsb-off module serves two batch sizes, the gsb-on
# module one and the popcount sums (binary layers do not depend on gsb).
IREE_BATCHES = {False: (1, 16), True: (16,)}
POPCOUNT_BATCH = 16
FORMATS = ('iree', 'onnx')


export_deploy = programs.load_tool('export_deploy')
# The two trained models' exports are module fixtures of their own, so a test of one model
# reuses its export; tests of both take `exported`. Each model is one xdist group (the name
# conftest gives a module fixture's group), so the two exports can run on both workers.
GSB = {name: pytest.param(name, marks=pytest.mark.xdist_group(f'{__name__}:{name}'))
       for name in ('gsb_off', 'gsb_on')}


def _export(gsb, tmp_path_factory):
  """{'config' (file), 'model', 'arrays' (packed), 'checkpoint', 'artifact': {format: path},
  'images': [png paths], 'batch' and 'labels' (the eval pipeline's), 'root', 'logits': {'float',
  'packed'}, 'popcounts': {layer: int32}, 'gsb'} of one trained fixture on the held-out digits;
  the IREE module has IREE_BATCHES[gsb] (and popcounts_b16 with gsb), the ONNX model a dynamic
  batch."""
  root = tmp_path_factory.mktemp(f'deploy_gsb{int(gsb)}')
  config_path = make_deploy_fixtures.write_config(root / 'tiny.py', gsb)
  config = config_lib.load_config_file(config_path)
  model = model_lib.build(config.model)
  checkpoint = str(make_deploy_fixtures.fixture_path(gsb))
  variables = ckpt_lib.load_any(checkpoint, model)  # raises on a file of another model
  artifact = {'iree': str(root / 'tiny.vmfb'), 'onnx': str(root / 'tiny.onnx')}
  export_deploy.export(config, checkpoint, 'iree', 'host',
                       ','.join(map(str, IREE_BATCHES[gsb])), artifact['iree'], popcounts=gsb)
  # Through the command line: its default is a dynamic batch.
  assert export_deploy.main(['export_deploy', '--config', config_path, '--checkpoint',
                             checkpoint, '--format', 'onnx', '--out', artifact['onnx']]) == 0
  source = data_lib.make_source(config, config.data.eval_split)
  images = []
  for i in range(NUM_IMAGES):
    images.append(str(root / f'digit{i}.png'))
    Image.fromarray(source[i][0]).save(images[-1])
  # The JAX models on the eval pipeline's batch of the same images.
  batch = next(iter(data_lib.build_eval_iter(config)))
  assert len(batch['image']) == NUM_IMAGES
  arrays = packed.arrays(packed.export(model, variables))
  logits = {'float': jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                          batch['image'])}
  logits['packed'], popcounts = jax.jit(
      lambda a, x: packed.apply(model, a, x, popcounts=True))(arrays, batch['image'])
  return {'config': config_path, 'model': model, 'arrays': arrays, 'checkpoint': checkpoint,
          'artifact': artifact, 'images': images, 'batch': batch['image'],
          'labels': batch['label'], 'root': root,
          'logits': {k: np.asarray(v) for k, v in logits.items()}, 'popcounts': popcounts,
          'gsb': gsb}


@pytest.fixture(scope='module')
def gsb_off(tmp_path_factory):
  return _export(False, tmp_path_factory)


@pytest.fixture(scope='module')
def gsb_on(tmp_path_factory):
  return _export(True, tmp_path_factory)


@pytest.fixture(params=GSB.values())
def exported(request):
  return request.getfixturevalue(request.param)


def _runtime_logits(artifact, files, threads=1):
  """Logits of `artifact` on image files through the runtime's own preprocessing."""
  model = deploy_runtime.Model(artifact, threads=threads)
  return model.predict_logits(np.stack([model.preprocess(deploy_runtime.load_image(p))
                                        for p in files]))


def _top1(logits, labels) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


@pytest.mark.parametrize('fmt', FORMATS)
def test_artifact_logits_equal_the_jax_models(exported, fmt):
  """Digit files through the runtime's preprocessing vs the eval pipeline's batch in JAX."""
  artifact = exported['artifact'][fmt]
  logits = _runtime_logits(artifact, exported['images'])
  labels = exported['labels']
  want = exported['logits']
  assert _top1(want['float'], labels) > 0.5  # chance: 0.1
  for name in ('float', 'packed'):
    assert logits.shape == want[name].shape
    assert reference.rel_error(logits, want[name]) <= 1e-5, name
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(want[name], -1), name)
    assert _top1(logits, labels) == _top1(want[name], labels), name
  meta = deploy_runtime.read_sidecar(artifact)
  umask = os.umask(0)
  os.umask(umask)
  for path in (artifact, deploy_runtime.sidecar_path(artifact)):  # not mkstemp's private 0600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path
  assert (meta['image_size'], meta['class_names']) == (32, list('0123456789'))
  assert (meta['runtime'], meta['batches']) == (
      (fmt, list(IREE_BATCHES[exported['gsb']])) if fmt == 'iree' else (fmt, None))


def test_iree_integer_parts_equal_the_jax_packed_model(gsb_on):
  """The module's `popcounts_b16`, compiled beside its `main_b*` from the same packed
  function, returns every binary layer's int32 XNOR-popcount sums: equal to JAX's, exactly."""
  artifact = gsb_on['artifact']['iree']
  meta = deploy_runtime.read_sidecar(artifact)
  want = gsb_on['popcounts']
  # The demo's binary layers all take 1-bit inputs: convs, q/k/v, projections, MLPs.
  assert meta['popcount_layers'] == sorted(want) == sorted(gsb_on['arrays']['binary'])
  module = deploy_runtime.load_iree_module(artifact)
  batch = POPCOUNT_BATCH
  for start in range(0, NUM_IMAGES, batch):
    got = getattr(module, f'popcounts_b{batch}')(gsb_on['batch'][start:start + batch])
    assert len(got) == len(want)
    for name, value in zip(meta['popcount_layers'], got):
      value = np.asarray(value.to_host())
      assert value.dtype == np.int32, name
      # Attention layers run on windows: their leading axis is images x windows.
      per_image = np.asarray(want[name]).reshape(NUM_IMAGES, -1)
      np.testing.assert_array_equal(value.reshape(batch, -1), per_image[start:start + batch],
                                    name)


def test_one_iree_module_serves_every_batch(gsb_off):
  """Each call takes the smallest function that holds the remaining images (padding dropped);
  the functions share one copy of the weights."""
  model = deploy_runtime.Model(gsb_off['artifact']['iree'], threads=1)
  images = gsb_off['batch']
  calls = []
  run = model._run  # pylint: disable=protected-access

  def recording(chunk):
    calls.append(len(chunk))
    return run(chunk)
  model._run = recording  # pylint: disable=protected-access
  for count, sizes in ((1, [1]), (5, [16]), (20, [16, 16])):
    calls.clear()
    logits = model.predict_logits(images[:count])
    assert calls == sizes, count
    assert reference.rel_error(logits, gsb_off['logits']['packed'][:count]) <= 1e-5, count
  # The functions share the weight constants: a dense layer's sign words are stored once.
  words = np.asarray(gsb_off['arrays']['binary']['layerB_1/intermediate/dense']['sign'])
  assert pathlib.Path(gsb_off['artifact']['iree']).read_bytes().count(words.tobytes()) == 1


@pytest.mark.parametrize('fmt', FORMATS)
def test_predict_prints_and_writes_the_top_classes(gsb_off, capsys, fmt):
  out = gsb_off['root'] / f'pred_{fmt}.jsonl'
  predict.main(['--artifact', gsb_off['artifact'][fmt], '--images', *gsb_off['images'],
                '--top', '3', '--out', str(out)])
  records = [json.loads(line) for line in out.read_text().splitlines()]
  logits = _runtime_logits(gsb_off['artifact'][fmt], gsb_off['images'], threads=None)
  assert [r['path'] for r in records] == gsb_off['images']
  assert [r['top'][0][0] for r in records] == [str(i) for i in np.argmax(logits, -1)]
  np.testing.assert_array_equal([r['logits'] for r in records], logits)
  assert all(len(r['top']) == 3 for r in records)
  assert len(capsys.readouterr().out.splitlines()) == NUM_IMAGES


def _fails(capsys, fn, argv, match, one_line=True):
  try:
    code = fn(argv)
  except SystemExit as e:  # predict exits itself; the tools return cli.run's status
    code = e.code
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('error: '), err
  assert match in err.splitlines()[0] and (err.count('\n') == 1 or not one_line), err


def test_bad_inputs_give_one_line_and_no_file(gsb_off, capsys, tmp_path):
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not an image')
  out = tmp_path / 'pred.jsonl'
  _fails(capsys, predict.main, ['--artifact', gsb_off['artifact']['iree'], '--images',
                                gsb_off['images'][0], str(broken), '--out', str(out)],
         'broken.png is not a readable image')
  assert not out.exists() and not pathlib.Path(str(out) + '.tmp').exists()
  # An artifact of another format version.
  other = tmp_path / 'other.vmfb'
  other.write_bytes(pathlib.Path(gsb_off['artifact']['iree']).read_bytes())
  meta = json.loads(pathlib.Path(gsb_off['artifact']['iree'] + '.json').read_text())
  pathlib.Path(str(other) + '.json').write_text(json.dumps({**meta, 'format': 'bhvit-deploy-v0'}))
  _fails(capsys, predict.main, ['--artifact', str(other), '--images', gsb_off['images'][0]],
         "another version of bhvit_jax (format 'bhvit-deploy-v0'")
  damaged = tmp_path / 'damaged.onnx'  # a damaged ONNX model
  damaged.write_bytes(pathlib.Path(gsb_off['artifact']['onnx']).read_bytes()[:1000])
  pathlib.Path(str(damaged) + '.json').write_text(
      pathlib.Path(gsb_off['artifact']['onnx'] + '.json').read_text())
  _fails(capsys, predict.main, ['--artifact', str(damaged), '--images', gsb_off['images'][0]],
         'damaged.onnx is not a loadable ONNX model')
  # Export: bad flags and a checkpoint of another configuration, nothing written.
  target = tmp_path / 'x.vmfb'
  common = ['export_deploy', '--config', gsb_off['config'], '--checkpoint', gsb_off['checkpoint'],
            '--out', str(target)]
  for flags, match in ((['--target', 'riscv'], "unknown --target 'riscv'"),
                       (['--format', 'tflite'], "unknown --format 'tflite'"),
                       (['--batch', '0,16'], "--batch sizes must be at least 1 ('0,16')"),
                       (['--batch', '1,x'],
                        "--batch must be positive integers separated by commas, not '1,x'"),
                       (['--format', 'onnx', '--batch', '1,16'],
                        "--format onnx takes one --batch size or none (dynamic), not '1,16'"),
                       (['--frmat', 'onnx'], 'unrecognized arguments: --frmat onnx')):
    _fails(capsys, export_deploy.main, common + flags, match)
  _fails(capsys, export_deploy.main, ['export_deploy', '--config',
                                      str(REPO / 'configs' / 'demo.py'), '--checkpoint',
                                      gsb_off['checkpoint'], '--out', str(target)],
         'was it written with another model config', one_line=False)  # + the shape listing
  assert not [n for n in os.listdir(tmp_path) if n.startswith(('x.', '.x.'))]


def test_predict_runs_in_a_virtual_environment_without_jax(gsb_off, tmp_path):
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
  for fmt, artifact in gsb_off['artifact'].items():
    out = tmp_path / f'pred_{fmt}.jsonl'
    run = subprocess.run([python, '-c', 'import importlib.util as u; '
                          'assert u.find_spec("jax") is None and u.find_spec("flax") is None; '
                          'from bhvit_jax import predict; predict.main()',
                          '--artifact', artifact, '--images', *gsb_off['images'],
                          '--out', str(out)], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = predict.predict(artifact, gsb_off['images'])
    assert [r['top'][0] for r in got] == [r['top'][0] for r in want], fmt
    np.testing.assert_array_equal([r['logits'] for r in got], [r['logits'] for r in want])
  print(f'fresh runtime environment + predict: {time.perf_counter() - start:.1f} s')
