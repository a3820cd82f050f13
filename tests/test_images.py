"""Real photographs through the reference's transforms (docs/reference.md §8) and the ImageFolder paths:
pixel equality with torchvision's rules written here with PIL primitives, and the defined
outcome of every awkward input of a converted data set."""

import io
import math
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from bhvit_jax import config_lib
from bhvit_jax import data
import programs

prepare_imagefolder = programs.load_tool('prepare_imagefolder')


@pytest.fixture(scope='module')
def variants(photos):
  """Real photographs at several sizes and aspect ratios: odd sides, portrait, square, a thin
  strip, and images smaller than a 224 crop."""
  china, flower = photos['china'], photos['flower']
  return {
      'china 640x427': china,
      'flower odd 501x333': flower.crop((17, 31, 518, 364)),
      'china portrait 157x301': china.crop((200, 50, 357, 351)),
      'flower square 300x300': flower.crop((100, 60, 400, 360)),
      'china short side 256': china.resize((383, 256), Image.LANCZOS),
      'flower strip 640x61': flower.crop((0, 180, 640, 241)),
      'china small 99x75': china.resize((99, 75), Image.LANCZOS),
      'flower tiny 31x47': flower.crop((300, 200, 331, 247)),
  }


def reference_eval(img, size, interpolation=Image.BICUBIC):
  """Resize(int(256/224·S)) then CenterCrop(S), torchvision's rules on a PIL image."""
  target = int((256 / 224) * size)
  w, h = img.size
  if w <= h:
    out_w, out_h = target, int(target * h / w)
  else:
    out_w, out_h = int(target * w / h), target
  if (out_w, out_h) != (w, h):
    img = img.resize((out_w, out_h), interpolation)
  top, left = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))


def reference_train(img, rng, size, scale):
  """RandomResizedCrop(S, scale) + RandomHorizontalFlip with torchvision's sampling rules,
  drawing from `rng` in torchvision's order."""
  width, height = img.size
  area, lo, hi = width * height, *np.log([3 / 4, 4 / 3])
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(lo, hi))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      break
  else:
    if width / height < 3 / 4:
      w, h = width, int(round(width / (3 / 4)))
    elif width / height > 4 / 3:
      w, h = int(round(height * (4 / 3))), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
  out = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))
  return out[:, ::-1] if rng.random() < 0.5 else out


@pytest.mark.parametrize('size', [224, 96])
def test_eval_transform_equals_the_reference_pixel_for_pixel(variants, size):
  for name, img in variants.items():
    want = reference_eval(img, size)
    got = data.eval_transform(np.asarray(img), size, int(size / data.EVAL_CROP_RATIO))
    assert got.shape == (size, size, 3) and got.dtype == np.uint8, name
    np.testing.assert_array_equal(got, want, err_msg=name)
    # From a PIL image (the decoded path) too.
    np.testing.assert_array_equal(
        data.eval_transform(img, size, int(size / data.EVAL_CROP_RATIO)), want, err_msg=name)
  bilinear = reference_eval(variants['china 640x427'], size, Image.BILINEAR)
  assert np.abs(bilinear.astype(int) - reference_eval(variants['china 640x427'], size)).max() > 8


@pytest.mark.parametrize('scale', [(0.08, 1.0), (0.99, 1.0)])
def test_train_transform_equals_the_reference_pixel_for_pixel(variants, scale):
  moved = 0
  for name, img in variants.items():
    for seed in range(6):
      got = data.train_transform(np.asarray(img), np.random.default_rng(seed), 64, scale, True,
                                 'bilinear')
      want = reference_train(img, np.random.default_rng(seed), 64, scale)
      np.testing.assert_array_equal(got, want, err_msg=f'{name} seed {seed}')
      # PIL's resize(box=...), the earlier implementation, reads pixels outside the box.
      box_rng = np.random.default_rng(seed)
      top, left, h, w = data.random_resized_crop_box(box_rng, img.height, img.width, scale)
      boxed = np.asarray(img.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h)))
      boxed = boxed[:, ::-1] if box_rng.random() < 0.5 else boxed
      moved += not np.array_equal(boxed, got)
  assert moved > 0


def folder_config(root, **data_fields):
  """A config reading root/val/<class>/ directly."""
  fields = dict(name='folder', data_dir=str(root), image_size=32, train_split='val',
                eval_split='val', num_workers=0, shuffle_seed=0, mean=(), std=(),
                on_corrupt='fail', eval_interpolation='bicubic',
                train_interpolation='bilinear', eval_crop_ratio=224 / 256, fast_decode=False)
  fields.update(data_fields)
  return ml_collections.ConfigDict(dict(seed=0, batch_size=2, data=fields))


def eval_pixels(config):
  """uint8 [S, S, 3]: the first eval image of `config`, de-normalized."""
  batch = next(data.build_eval_iter(config, process_index=0, process_count=1))
  std, mean = np.asarray(data.IMAGENET_STD), np.asarray(data.IMAGENET_MEAN)
  return np.round((batch['image'][0] * std + mean) * 255).astype(np.uint8)


def test_interpolation_and_crop_ratio_come_from_the_config(photos, tmp_path):
  img = photos['flower'].crop((0, 0, 301, 203))
  (tmp_path / 'val' / 'flower').mkdir(parents=True)
  img.save(tmp_path / 'val' / 'flower' / 'f.png')
  config = folder_config(tmp_path, image_size=64)
  pixels = lambda: eval_pixels(config)
  np.testing.assert_array_equal(pixels(), reference_eval(img, 64))
  config.data.update(eval_interpolation='bilinear', eval_crop_ratio=0.5)
  # Shorter side 128, longer int(128·301/203) = 189; left = round(62.5) = 62 (half to even).
  np.testing.assert_array_equal(pixels(), np.asarray(
      img.resize((189, 128), Image.BILINEAR).crop((62, 32, 126, 96))))
  config.data.eval_interpolation = 'cubic'
  with pytest.raises(config_lib.UserError, match="eval_interpolation='cubic'"):
    data.build_eval_iter(config, process_index=0, process_count=1)


def test_fast_decode_is_opt_in_and_decodes_no_smaller_than_the_resize(photos, tmp_path):
  path = tmp_path / 'val' / 'china' / 'big.jpg'
  _save(photos['china'].resize((1280, 854), Image.BICUBIC), path, quality=90)
  config = folder_config(tmp_path, image_size=64)
  with Image.open(path) as img:
    exact = reference_eval(img.convert('RGB'), 64)
  np.testing.assert_array_equal(eval_pixels(config), exact)
  config.data.fast_decode = True
  fast = eval_pixels(config)
  assert not np.array_equal(fast, exact)
  assert np.abs(fast.astype(int) - exact).mean() < 8
  # JPEG draft scales by 1/8 at most down to the eval resize side (73 for 64).
  assert data.decode_image(path.read_bytes(), 73).size == (160, 107)


# ------------------------------------------------------------ ImageFolder ---


def _save(img, path, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, **kwargs)


def _exif_rotated_jpeg(img, path):
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
  _save(img, path, exif=exif, quality=90)


@pytest.fixture(scope='module')
def awkward_tree(photos, tmp_path_factory):
  """src/{train,val}/<class>/: every torchvision extension, every PIL mode the reference
  converts, an EXIF-rotated JPEG, a non-image, a truncated JPEG and a 0-byte file; class 'b'
  is empty in train and missing from val. Returns (src, expected files per split)."""
  src = tmp_path_factory.mktemp('awkward') / 'src'
  photo = photos['china'].resize((64, 43), Image.LANCZOS)
  cls = src / 'train' / 'a'
  _save(photo, cls / '01.JPEG', quality=90)
  _save(photo.convert('L'), cls / '02_grey.png')
  _save(photo.convert('RGBA'), cls / '03_rgba.png')
  _save(photo.convert('P'), cls / '04_palette.png')
  _save(photo.convert('CMYK'), cls / '05_cmyk.jpg', quality=90)
  sixteen = Image.fromarray((np.asarray(photo.convert('L'), np.uint16) * 257))
  _save(sixteen, cls / '06_16bit.png')
  _save(photo, cls / '07.ppm')
  _save(photo.convert('L'), cls / '08.pgm')
  _save(photo, cls / '09.tif')
  _save(photo, cls / '10.TIFF')
  _save(photo, cls / '11.bmp')
  _save(photo, cls / '12.webp', lossless=True)
  _exif_rotated_jpeg(photo, cls / '13_exif.jpeg')
  (cls / 'notes.txt').write_text('not an image')
  buffer = io.BytesIO()
  photo.save(buffer, 'JPEG', quality=90)
  (cls / '14_truncated.jpg').write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  (cls / '15_empty.jpg').write_bytes(b'')
  (src / 'train' / 'b').mkdir()
  _save(photos['flower'].resize((40, 30)), src / 'train' / 'c' / 'deep' / 'x.png')
  _save(photos['flower'].resize((30, 40)), src / 'val' / 'c' / 'y.jpg')
  _save(photo, src / 'val' / 'a' / 'z.bmp')
  good = sorted(p for p in cls.iterdir() if p.suffix != '.txt' and p.name[:2] not in ('14', '15'))
  return src, {'train': [(p, 0) for p in good] + [(src / 'train/c/deep/x.png', 2)],
               'val': [(src / 'val/a/z.bmp', 0), (src / 'val/c/y.jpg', 2)]}


def _assert_source_matches(source, expected):
  assert len(source) == len(expected)
  for index, (path, label) in enumerate(expected):
    image, got_label = source[index]
    with Image.open(path) as img:
      want = np.asarray(img.convert('RGB'))  # the reference loader
    assert got_label == label, path
    np.testing.assert_array_equal(np.asarray(image), want, err_msg=str(path))


def test_conversion_defines_every_awkward_input(awkward_tree, tmp_path, capsys):
  src, expected = awkward_tree
  out = tmp_path / 'out'
  prepare_imagefolder.main(['prepare_imagefolder', str(src), str(out), '--on-corrupt', 'skip', '--workers', '1'])
  captured = capsys.readouterr()
  assert '14_truncated.jpg' in captured.err and '15_empty.jpg' in captured.err
  assert 'train: 14 images written, 2 unreadable skipped, 1 non-image files ignored' in (
      captured.out)
  assert 'val: 2 images written, 0 unreadable skipped' in captured.out
  assert data.ImageFolderSource(str(out), 'train').classes() == ['a', 'b', 'c']
  for split in ('train', 'val'):
    _assert_source_matches(data.ImageFolderSource(str(out), split), expected[split])
  # EXIF orientation is not applied (the photo is stored landscape, displayed portrait).
  exif_index = [p.name for p, _ in expected['train']].index('13_exif.jpeg')
  assert np.asarray(data.ImageFolderSource(str(out), 'train')[exif_index][0]).shape == (
      43, 64, 3)


def test_conversion_stops_naming_an_unreadable_file(awkward_tree, tmp_path, capsys):
  out = tmp_path / 'out'
  code = prepare_imagefolder.main(['prepare_imagefolder', str(awkward_tree[0]), str(out),
                                   '--workers', '1'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.startswith('error: unreadable image') and '14_truncated.jpg' in err
  assert len(err.splitlines()) == 1
  assert not out.exists() and os.listdir(tmp_path) == []


def test_folder_source_reads_the_tree_directly(awkward_tree):
  src, expected = awkward_tree
  source = data.FolderSource(str(src / 'train'))
  assert source.classes() == ['a', 'b', 'c'] and source.ignored == 1
  files = sorted(p for p in (src / 'train' / 'a').iterdir() if p.suffix != '.txt')
  assert source.items == [(str(p), 0) for p in files] + [(str(src / 'train/c/deep/x.png'), 2)]
  with pytest.raises(data.CorruptRecordError, match='14_truncated.jpg'):
    source[13]
  with pytest.raises(data.CorruptRecordError, match='15_empty.jpg'):
    source[14]


def _tree(root, photos, classes=('x', 'y'), per_class=3):
  for label, name in enumerate(classes):
    for i in range(per_class):
      img = photos['flower'].crop((40 * i, 30 * label, 40 * i + 50, 30 * label + 40))
      for split in ('train', 'val'):
        _save(img, root / split / name / f'{i}.png')
  return root


def _listing(root):
  return sorted(p.name for p in root.iterdir())


def test_rerun_with_other_shard_counts_leaves_one_set(photos, tmp_path):
  src, out = _tree(tmp_path / 'src', photos), tmp_path / 'out'
  prepare_imagefolder.prepare(str(src), str(out), num_shards=3)
  prepare_imagefolder.prepare(str(src), str(out), num_shards=2)
  assert _listing(out) == ['labels.json'] + [
      f'{s}.array_record-0000{i}-of-00002' for s in ('train', 'val') for i in range(2)]
  assert _listing(tmp_path) == ['out', 'src']  # no temporary directory left beside
  assert len(data.ImageFolderSource(str(out), 'train')) == 6


def test_interrupted_run_leaves_the_old_data_intact(photos, tmp_path, monkeypatch):
  src, out = _tree(tmp_path / 'src', photos), tmp_path / 'out'
  prepare_imagefolder.prepare(str(src), str(out), num_shards=2)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  original, calls = prepare_imagefolder.read_checked, []

  def interrupted(path):  # in the second split: the first one is complete by then
    calls.append(path)
    if len(calls) == 8:
      raise KeyboardInterrupt
    return original(path)
  monkeypatch.setattr(prepare_imagefolder, 'read_checked', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare_imagefolder.prepare(str(src), str(out), num_shards=3)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert _listing(tmp_path) == ['out', 'src']


def test_reader_refuses_mixed_shard_sets_and_converter_foreign_files(photos, tmp_path):
  src, out = _tree(tmp_path / 'src', photos), tmp_path / 'out'
  prepare_imagefolder.prepare(str(src), str(out), num_shards=2)
  (out / 'train.array_record-00000-of-00003').write_bytes(
      (out / 'train.array_record-00000-of-00002').read_bytes())
  with pytest.raises(config_lib.UserError, match=r"inconsistent shard names for split 'train'"
                     r'.*-of-00002.*-of-00003') as error:
    data.ImageFolderSource(str(out), 'train')
  assert '\n' not in str(error.value)
  (out / 'mine.txt').write_text('keep me')
  with pytest.raises(config_lib.UserError, match='mine.txt'):
    prepare_imagefolder.prepare(str(src), str(out))
  assert (out / 'mine.txt').read_text() == 'keep me'
