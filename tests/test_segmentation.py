"""Backbone features, the digit-mask task, mIoU and a few segmentation training steps."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import data as data_lib
from bhvit_jax import model as model_lib
from bhvit_jax import segmentation

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
  model = model_lib.BHViT(**TINY, image_size=32, window_size=1)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  last_blocks = ('layerA_0', 'layerA_1', 'layerB_0', 'layerB_1')  # one block per stage

  # Random parameters, unit running variances (no initialization to compile).
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones if path[-1].key == 'var' else rng.standard_normal)(s.shape).astype(
          s.dtype), jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images)))

  @jax.jit
  def run(images):
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


@pytest.mark.parametrize('binary', [True, False])
def test_fpn_head(binary):
  model = segmentation.SegmentationModel(
      model_lib.BHViT(**TINY, image_size=32, window_size=1),
      segmentation.FPNHead(segmentation.NUM_CLASSES, features=8, binary=binary))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  assert jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))), shapes).shape == (
      2, 32, 32, segmentation.NUM_CLASSES)
  head = segmentation.FPNHead(segmentation.NUM_CLASSES, features=8, binary=binary)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  maps = [jax.random.normal(k, (2, 8 >> i, 8 >> i, 8 << i)) for i, k in enumerate(keys)]
  logits, scaled = jax.jit(lambda v: (head.apply(v, maps, False),
                                      head.apply(v, [3 * m for m in maps], False)))(
                                          head.init(jax.random.PRNGKey(0), maps, False))
  assert logits.shape == (2, 8, 8, segmentation.NUM_CLASSES)
  # A binary head reads only the signs of the features.
  assert np.array_equal(logits, scaled) == binary


def test_segmentation_run_trains_evaluates_and_resumes(tmp_path):
  """The task's own loop (configs/segmentation_demo.py, shrunk): two steps, a checkpoint,
  strict-JSON metrics with the final mIoU; a rerun resumes instead of training again."""
  from configs import segmentation_demo  # pylint: disable=g-import-not-at-top
  config = segmentation_demo.get_config()
  config.model.update(hidden_sizes=TINY['hidden_sizes'], mlp_sizes=TINY['mlp_sizes'],
                      num_heads=TINY['num_heads'])
  config.segmentation.update(head_features=8, eval_canvases=4)
  config.update(batch_size=4, total_steps=2, checkpoint_every_steps=1, eval_every_steps=0,
                log_every_steps=1)
  config.optim.warmup_steps = 1
  state, summary = segmentation.train_and_evaluate(config, str(tmp_path))
  assert summary['step'] == 2 and 0 <= summary['miou'] <= 100
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2]
  assert [r['miou'] for r in records if r['kind'] == 'eval'] == [summary['miou']]
  _, again = segmentation.train_and_evaluate(config, str(tmp_path))
  assert again == summary
  assert int(state.step) == 2
