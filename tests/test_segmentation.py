"""Backbone features, the digit-mask task, mIoU and a few segmentation training steps."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import data as data_lib
from bhvit_jax import model as model_lib
from bhvit_jax import plots
from bhvit_jax import segmentation

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
            mlp_sizes=(16, 32, 64, 128), num_classes=3, patch_size=4, split_groups=True)


@pytest.mark.parametrize('size,window', [(224, 7), (256, 1)])
def test_feature_shapes(size, window):
  model = model_lib.BHViT(**TINY, image_size=size, window_size=window)
  images = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  maps = jax.eval_shape(lambda v: model.apply(v, images, method='features'), variables)
  assert [m.shape for m in maps] == [(2, size // s, size // s, c)
                                     for s, c in zip((4, 8, 16, 32), TINY['hidden_sizes'])]
  assert 'classifier' in variables['params']  # the classifier's variables are unchanged


def test_features_are_the_classifier_activations():
  model = model_lib.BHViT(**TINY, image_size=224, window_size=7)
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 224, 224, 3))
  last_blocks = ('layerA_0', 'layerA_1', 'layerB_0', 'layerB_1')

  @jax.jit
  def run(images):
    variables = model.init(jax.random.PRNGKey(0), images)
    maps = model.apply(variables, images, method='features')
    _, state = model.apply(variables, images, capture_intermediates=(
        lambda m, name: name == '__call__' and m.name in last_blocks), mutable=['intermediates'])
    return maps, [state['intermediates'][b]['__call__'][0] for b in last_blocks]
  maps, activations = run(images)
  for got, want in zip(maps, activations):
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_array_equal(got, want)


def test_mean_iou_against_a_hand_count():
  mask = jnp.array([[0, 0, 1, 1], [2, 2, 2, 0]])
  pred = jnp.array([[0, 1, 1, 1], [2, 2, 0, 0]])
  counts = segmentation.confusion(pred, mask, num_classes=4)
  # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 2, FN 1 -> 2/3;
  # class 3 is absent from both and not averaged.
  assert counts.sum() == 8 and int(counts[2, 0]) == 1
  np.testing.assert_allclose(segmentation.mean_iou(counts), 100 * (1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_canvas_is_deterministic_and_labels_strokes():
  digits = data_lib.MnistSource('test', segmentation.DIGIT_SIZE)
  draw = lambda: segmentation.canvas(digits, np.random.default_rng([0, 1, 5]), 64, 2)
  (image, classes), (image2, classes2) = draw(), draw()
  np.testing.assert_array_equal(image, image2)
  np.testing.assert_array_equal(classes, classes2)
  np.testing.assert_array_equal(classes > 0, image > segmentation.STROKE_THRESHOLD)
  assert classes.max() > 0


def _segmentation_config():
  spec = importlib.util.spec_from_file_location(
      'segmentation_config', REPO / 'configs' / 'segmentation_demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(TINY, image_size=32, window_size=1)
  config.data.image_size = 32
  config.segmentation.update(cells=1, head_features=8, binary_head=True, eval_canvases=8)
  config.update(batch_size=8, total_steps=6, log_every_steps=1, eval_every_steps=0,
                checkpoint_every_steps=3)
  return config


def test_training_lowers_the_loss_and_resumes(tmp_path):
  config = _segmentation_config()
  _, summary = segmentation.train_and_evaluate(config, str(tmp_path))
  history = [r for r in plots.read_history(str(tmp_path))
             if r['kind'] == 'train']
  assert [r['step'] for r in history] == list(range(1, 7))
  assert history[-1]['loss'] < history[0]['loss'] - 0.3
  assert summary['step'] == 6 and 0 <= summary['miou'] <= 100
  _, again = segmentation.train_and_evaluate(config, str(tmp_path))  # finished: nothing to do
  assert again == summary
