"""Augmentation options (timm semantics): op values, erasing, mixup/cutmix, repeats, determinism."""
import pathlib

import numpy as np
import pytest

from bhvit_jax import augment
from bhvit_jax.config_lib import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _image(seed=0, size=(24, 40)):
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _config(**overrides):
  config = augment.defaults()
  config.update(overrides)
  return config


def test_defaults_are_off():
  config = augment.defaults()
  image = _image()
  rng = np.random.default_rng(0)
  assert augment.augment_image(image, rng, config, (0.5,) * 3) is image
  assert augment.random_erasing(image, rng, config.reprob) is image
  assert not augment.mixing_active(config)
  assert config.repeated_aug == 1
  assert rng.random() == np.random.default_rng(0).random()  # nothing was drawn


@pytest.mark.parametrize('field,value', [
    ('rand_augment', 'rand-x1'), ('interpolation', 'lanczos'), ('remode', 'noise'),
    ('reprob', 1.5), ('mixup_prob', -0.1), ('mixup_alpha', -1.0), ('repeated_aug', 0)])
def test_validate_names_the_bad_field(field, value):
  augment.validate(augment.defaults())
  with pytest.raises(ConfigError, match=f'augment.{field}'):
    augment.validate(_config(**{field: value}))


def test_parse_rand_augment():
  assert augment.parse_rand_augment('rand-m9-mstd0.5-inc1') == augment.RandAugmentSpec(
      magnitude=9, num_ops=2, magnitude_std=0.5, increasing=True)
  assert augment.parse_rand_augment('rand-n3-m7-mstd101').magnitude_std == np.inf
  for bad in ('auto-m9', 'rand-m9-w0', 'rand-q1'):
    with pytest.raises(ConfigError, match='rand_augment'):
      augment.parse_rand_augment(bad)


@pytest.mark.parametrize('name,magnitude,expected', [
    ('Posterize', 5, lambda x: x & 0b11000000),  # increasing: 4 − int(5/10·4) = 2 bits kept
    ('Posterize', 10, lambda x: np.zeros_like(x)),  # 0 bits kept
    ('Solarize', 5, lambda x: np.where(x >= 128, 255 - x, x)),  # threshold 256 − 128
    ('SolarizeAdd', 5, lambda x: np.where(x < 128, np.minimum(x.astype(int) + 55, 255), x)),
    ('Invert', 3, lambda x: 255 - x),
])
def test_lut_ops_match_hand_computed(name, magnitude, expected):
  image = _image()
  argument = augment.op_argument(name, magnitude, np.random.default_rng(0), increasing=True)
  np.testing.assert_array_equal(augment.apply_op(image, name, argument), expected(image))


def test_brightness_increasing_scales_pixels():
  image = _image()
  factors = {augment.op_argument('Brightness', 5, np.random.default_rng(s), True)
             for s in range(20)}
  assert sorted(factors) == pytest.approx([0.55, 1.45])  # 1 ± 0.9·5/10, either sign
  out = augment.apply_op(image, 'Brightness', 1.45).astype(int)
  reference = np.clip(image * 1.45, 0, 255)
  assert np.abs(out - reference).max() <= 1


def test_translate_x_shifts_and_fills():
  image = _image()  # 40 wide: 0.225 · 40 = 9 pixels
  assert abs(augment.op_argument('TranslateXRel', 5, np.random.default_rng(1), True)) == 0.225
  fill = (124, 116, 104)
  out = augment.apply_op(image, 'TranslateXRel', 0.225, fill)
  np.testing.assert_array_equal(out[:, :31], image[:, 9:])
  np.testing.assert_array_equal(out[:, 31:], np.broadcast_to(fill, (24, 9, 3)))


def test_erasing_changes_one_rectangle_only():
  image = np.random.default_rng(0).standard_normal((32, 48, 3)).astype(np.float32)
  for seed in range(5):
    out = augment.random_erasing(image, np.random.default_rng(seed), prob=1.0, mode='pixel')
    changed = np.any(out != image, axis=-1)
    rows, cols = np.nonzero(changed)
    box = np.zeros_like(changed)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    np.testing.assert_array_equal(changed, box)
    assert 0.02 <= box.mean() <= 1 / 3 + 0.05
  const = augment.random_erasing(image, np.random.default_rng(0), prob=1.0, mode='const')
  assert np.all((const == image) | (const == 0))
  assert augment.random_erasing(image, np.random.default_rng(0), prob=0.0) is image
  with pytest.raises(ConfigError, match='remode'):
    augment.random_erasing(image, np.random.default_rng(0), 1.0, mode='noise')


def _batch(size=6, num_classes=5):
  rng = np.random.default_rng(3)
  images = rng.standard_normal((size, 8, 10, 3)).astype(np.float32)
  return images, np.array([0, 1, 2, 3, 4, 0][:size])


def test_mixup_targets_sum_to_one_with_the_drawn_lambda():
  images, labels = _batch()
  config = _config(mixup_alpha=0.8)
  mixed, targets, lam = augment.mix_batch(images, labels, np.random.default_rng(4), config,
                                          num_classes=5, label_smoothing=0.1)
  assert 0 < lam < 1
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5,
                             atol=1e-6)
  # labels 0 and 0 are mirrors (rows 0, 5): same class, full weight; row 1 mixes 1 with 4.
  np.testing.assert_allclose(targets[0, 0], 0.9 + 0.02, rtol=1e-6)
  np.testing.assert_allclose(targets[1, [1, 4]], [lam * 0.9 + 0.02, (1 - lam) * 0.9 + 0.02],
                             rtol=1e-6)


def test_cutmix_lambda_is_the_kept_area():
  images, labels = _batch()
  config = _config(cutmix_alpha=1.0, mixup_alpha=0.8, mixup_switch_prob=1.0)
  for seed in range(4):
    mixed, targets, lam = augment.mix_batch(images, labels, np.random.default_rng(seed),
                                            config, num_classes=5, label_smoothing=0.0)
    kept = np.all(mixed == images, axis=-1).mean(axis=(1, 2))
    pasted = np.all(mixed == images[::-1], axis=-1).mean(axis=(1, 2))
    np.testing.assert_allclose(kept, lam)
    np.testing.assert_allclose(kept + pasted, 1.0)
    np.testing.assert_allclose(targets[1, [1, 4]], [lam, 1 - lam], rtol=1e-6)


def test_unmixed_batch_keeps_smoothed_targets():
  images, labels = _batch()
  config = _config(mixup_alpha=0.8, mixup_prob=0.0)
  mixed, targets, lam = augment.mix_batch(images, labels, np.random.default_rng(0), config,
                                          num_classes=5, label_smoothing=0.1)
  assert lam == 1.0 and mixed is images
  np.testing.assert_allclose(targets, augment.one_hot_targets(labels, 5, 0.1))


def test_soft_cross_entropy_matches_smoothed_cross_entropy():
  from bhvit_jax import losses  # pylint: disable=g-import-not-at-top
  logits = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
  labels = np.array([0, 3, 2, 4])
  np.testing.assert_allclose(
      losses.soft_cross_entropy(logits, augment.one_hot_targets(labels, 5, 0.1)),
      losses.cross_entropy(logits, labels, label_smoothing=0.1), rtol=1e-6)


def test_repeated_indices_put_copies_on_different_replicas():
  shares = augment.repeated_indices(7, 2, 12, 3, 3)
  assert shares.shape == (3, 4) and all(len(set(share)) == 4 for share in shares)
  assert set(shares[0]) == set(shares[1]) == set(shares[2])  # each example once per replica
  np.testing.assert_array_equal(shares, augment.repeated_indices(7, 2, 12, 3, 3))
  assert not np.array_equal(shares, augment.repeated_indices(7, 3, 12, 3, 3))
  # The official sampler's wrap: 10 examples · 3 = 30 → 32 entries for 4 replicas of 2.
  wrapped = augment.repeated_indices(0, 0, 10, 3, 4)
  perm = np.repeat(augment.repeated_indices(0, 0, 10, 1, 1)[0], 3)
  np.testing.assert_array_equal(wrapped, np.concatenate([perm, perm[:2]]).reshape(8, 4).T[:, :2])
  np.testing.assert_array_equal(augment.repeated_indices(5, 1, 9, 1, 1)[0],
                                np.random.default_rng([5, augment.REPEAT_TAG, 1]).permutation(9))
  order = augment.repeated_epoch_order(7, 2, 12, 3, num_replicas=3, replica_batch=2)
  np.testing.assert_array_equal(order[:6], np.concatenate([s[:2] for s in shares]))
  np.testing.assert_array_equal(order[6:], np.concatenate([s[2:] for s in shares]))


def _pipeline(seed, step, slot):
  """What a worker does for one example: stage 1, normalize, stage 2."""
  config = _config(rand_augment='rand-m9-mstd0.5-inc1', reprob=0.5)
  rng = np.random.default_rng([seed, 1, step, slot])
  out = augment.augment_image(_image(size=(32, 32)), rng, config, (0.485, 0.456, 0.406))
  return augment.random_erasing(out.astype(np.float32) / 255.0, rng, config.reprob)


def test_per_image_augmentation_is_a_function_of_seed_step_slot():
  outputs = [_pipeline(*key) for key in [(0, 5, 2)] * 2 + [(0, 5, 3), (0, 6, 2), (1, 5, 2)]]
  np.testing.assert_array_equal(outputs[0], outputs[1])
  for other in outputs[2:]:
    assert not np.array_equal(outputs[0], other)
  jittered = [augment.color_jitter(_image(), np.random.default_rng(s), 0.4) for s in (0, 0, 1)]
  np.testing.assert_array_equal(jittered[0], jittered[1])
  assert not np.array_equal(jittered[0], jittered[2])
  np.testing.assert_array_equal(augment.color_jitter(_image(), np.random.default_rng(0), 0.0),
                                _image())


def test_batch_mixing_is_a_function_of_seed_step_process():
  images, labels = _batch()
  config = _config(mixup_alpha=0.8, cutmix_alpha=1.0)
  results = [augment.mix_batch(images, labels, augment.batch_rng(*key), config, 5, 0.1)[0]
             for key in [(0, 9, 0), (0, 9, 0), (0, 10, 0), (0, 9, 1)]]
  np.testing.assert_array_equal(results[0], results[1])
  for other in results[2:]:
    assert not np.array_equal(results[0], other)


def test_increasing_ops_are_identity_at_magnitude_zero():
  image = _image()
  rng = np.random.default_rng(0)
  for name in augment.OP_NAMES:
    out = augment.apply_op(image, name, augment.op_argument(name, 9, rng, True))
    assert out.shape == image.shape and out.dtype == np.uint8
    if name not in ('AutoContrast', 'Equalize', 'Invert', 'Posterize'):
      zero = augment.apply_op(image, name, augment.op_argument(name, 0, rng, True))
      np.testing.assert_array_equal(zero, image, err_msg=name)


@pytest.mark.parametrize('switch_prob', [0.0, 1.0])  # mixup, cutmix
def test_apply_mix_on_device_matches_the_worker(switch_prob):
  import jax  # pylint: disable=g-import-not-at-top
  images, labels = _batch()
  config = _config(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=switch_prob)
  mixed, targets, lam = augment.mix_batch(images, labels, np.random.default_rng(2), config, 5,
                                          0.1)
  keep, lam_drawn = augment.draw_mix(np.random.default_rng(2), config, 8, 10)
  assert lam_drawn == lam
  on_device = jax.jit(augment.apply_mix)(images, augment.one_hot_targets(labels, 5, 0.1),
                                         keep, np.float32(lam))
  np.testing.assert_allclose(on_device[0], mixed, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(on_device[1], targets, rtol=1e-6, atol=1e-7)
  if switch_prob:
    np.testing.assert_array_equal(on_device[0], mixed)


def test_train_stream_with_every_option_on_is_a_function_of_the_step():
  """Wired into data.py: erased/mixed batches with soft targets, identical when a resumed
  iterator starts at the same step (resume stays bitwise)."""
  from bhvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import data  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(str(REPO / 'configs' / 'demo.py'))
  config.batch_size = 8
  config.augment.update(rand_augment='rand-m9-mstd0.5-inc1', reprob=0.5, mixup_alpha=0.8,
                        cutmix_alpha=1.0)
  read = lambda start: data.build_train_iter(config, start_step=start, process_index=0,
                                             process_count=1)
  fresh = iter(read(0))
  batches = [next(fresh) for _ in range(3)]
  resumed = next(iter(read(2)))
  for key in ('image', 'label', 'target'):
    np.testing.assert_array_equal(resumed[key], batches[2][key])
  targets = batches[0]['target']
  assert targets.shape == (8, 10)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])
  plain = config.copy_and_resolve_references()
  plain.augment = augment.defaults()
  unaugmented = next(iter(data.build_train_iter(plain, process_index=0, process_count=1)))
  assert 'target' not in unaugmented
  assert not np.array_equal(unaugmented['image'], batches[0]['image'])


def test_total_loss_takes_soft_targets_in_place_of_labels():
  from bhvit_jax import losses  # pylint: disable=g-import-not-at-top
  logits = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  labels = np.array([0, 3, 4, 1])
  soft, _ = losses.total_loss(logits, augment.one_hot_targets(labels, 5, 0.1))
  hard, _ = losses.total_loss(logits, labels, label_smoothing=0.1)
  np.testing.assert_allclose(soft, hard, rtol=1e-6)


def test_repeated_augmentation_reads_each_example_several_times_in_one_epoch():
  from bhvit_jax import data  # pylint: disable=g-import-not-at-top
  kwargs = dict(seed=3, num_examples=40, global_batch=8, process_count=1)
  plain = np.concatenate([data.train_indices(s, process_index=0, **kwargs) for s in range(5)])
  order = np.concatenate([data.train_indices(s, process_index=0, repeats=3, **kwargs)
                          for s in range(5)])
  assert len(order) == len(plain) == 40 and sorted(plain) == list(range(40))
  # Each example read three times in a row; about a third of the examples per epoch.
  np.testing.assert_array_equal(order[:39].reshape(13, 3), np.repeat(order[:39:3], 3)
                                .reshape(13, 3))
  assert len(set(order)) == 14
  kwargs['process_count'] = 2  # process 1 reads the second half of the same global batch
  np.testing.assert_array_equal(
      data.train_indices(2, process_index=1, repeats=3, **kwargs), order[20:24])
