"""Writes tests/data/deploy_gsb{0,1}.msgpack: the tiny BHViT of test_tools.TINY_CONFIG with its
gsb attention quantizer off and on, trained briefly on the embedded digits.

  PYTHONPATH=. python tests/make_deploy_fixtures.py

Trained, not random: BatchNorm statistics and the attention quantizers' calibration are real
and held-out top-1 is far above chance, so test_deploy compares artifacts with a model whose
activations look like a trained one's. Run again after a change of the model's variables; the
tests fail on a file that no longer matches the model.
"""
import pathlib
import sys
import tempfile

import ml_collections

from bhvit_jax import config_lib
from bhvit_jax import convert
from bhvit_jax import train

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import test_tools  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 80


def fixture_path(gsb: bool) -> pathlib.Path:
  return HERE / 'data' / f'deploy_gsb{int(gsb)}.msgpack'


def write_config(path: pathlib.Path, gsb: bool) -> str:
  """Writes TINY_CONFIG with `model.gsb` set to the config file `path`; returns the path."""
  end = '  return config\n'
  assert test_tools.TINY_CONFIG.endswith(end)
  path.write_text(test_tools.TINY_CONFIG[:-len(end)] + f'  config.model.gsb = {gsb}\n' + end)
  return str(path)


def fixture_config(gsb: bool) -> ml_collections.ConfigDict:
  with tempfile.TemporaryDirectory() as tmp:
    return config_lib.load_config_file(write_config(pathlib.Path(tmp) / 'tiny.py', gsb))


def main():
  for gsb in (False, True):
    config = fixture_config(gsb)
    with config.unlocked():
      config.update(total_steps=STEPS, checkpoint_every_steps=STEPS,
                    eval_every_steps=0)
      config.optim.warmup_steps = 10
    with tempfile.TemporaryDirectory() as workdir:
      state, summary = train.train_and_evaluate(config, workdir)
    variables = {k: v for k, v in state.variables().items() if v}
    convert.save_flax_file(variables, fixture_path(gsb))
    print(f'gsb={gsb}: held-out top-1 {summary["top1"]:.4f} -> {fixture_path(gsb)}')


if __name__ == '__main__':
  main()
