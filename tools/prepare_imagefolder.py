"""Converts an ImageFolder tree into ArrayRecord shards for data.name='imagefolder'.

  python tools/prepare_imagefolder.py SRC_DIR OUT_DIR [--num-shards N]

SRC_DIR/<split>/<class>/<image> becomes OUT_DIR/<split>.array_record-IIIII-of-NNNNN
(records: bhvit_jax.data.encode_record(original bytes, label)) plus
OUT_DIR/labels.json, the class names sorted by folder name (label = position),
as torchvision's ImageFolder assigns them.
"""

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

from array_record.python import array_record_module
import numpy as np
from PIL import Image

from bhvit_jax import cli
from bhvit_jax import data

UserError = cli.UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def list_classes(split_dir: str) -> list[str]:
  if not os.path.isdir(split_dir):
    raise UserError(f'source directory does not exist ({split_dir})')
  classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  if not classes:
    raise UserError(f'no class sub-directories in {split_dir}')
  return classes


def list_images(split_dir: str, classes: list[str]) -> list[tuple[str, int]]:
  """(path, label) pairs in class order, then file-name order."""
  known = set(classes)
  extra = sorted(set(list_classes(split_dir)) - known)
  if extra:
    raise UserError(f'{split_dir!r} has classes absent from the train split: {extra}')
  items = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    files = sorted(f for f in os.listdir(class_dir)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    items.extend((os.path.join(class_dir, f), label) for f in files)
  return items


def read_checked(path: str) -> tuple[bytes | None, str]:
  """(file bytes, '') if the image fully decodes, else (None, reason)."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
      img.load()
    return raw, ''
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return None, str(e) or type(e).__name__


def write_split(items, out_dir: str, split: str, num_shards: int, on_corrupt: str,
                workers: int) -> tuple[int, int]:
  """Writes the shards of one split; returns (written, skipped)."""
  num_shards = max(1, min(num_shards, len(items)))
  bounds = np.linspace(0, len(items), num_shards + 1).astype(int)
  written = skipped = 0
  with contextlib.ExitStack() as stack:
    pool = (stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers))
            if workers > 1 else None)
    for shard in range(num_shards):
      path = os.path.join(out_dir, f'{split}.array_record-{shard:05d}-of-{num_shards:05d}')
      chunk = items[bounds[shard]:bounds[shard + 1]]
      writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
      try:
        paths = [p for p, _ in chunk]
        checked = (pool.map(read_checked, paths, chunksize=64) if pool
                   else map(read_checked, paths))
        for (image_path, label), (raw, reason) in zip(chunk, checked):
          if raw is None:
            if on_corrupt == 'fail':
              raise UserError(f'unreadable image {image_path!r}: {reason}')
            print(f'skipping unreadable image {image_path!r}: {reason}', file=sys.stderr)
            skipped += 1
            continue
          writer.write(data.encode_record(raw, label))
          written += 1
      finally:
        writer.close()
  return written, skipped


def prepare(src_dir: str, out_dir: str, *, splits=('train', 'val'), num_shards: int = 1,
            on_corrupt: str = 'fail', workers: int = 1) -> dict[str, tuple[int, int]]:
  """Converts every split; returns {split: (written, skipped)}.

  The shards are written into a temporary directory inside `out_dir` and moved into place
  when every split is complete, so a failure leaves `out_dir`'s files as they were.
  """
  if on_corrupt not in ('skip', 'fail'):
    raise UserError(f"on_corrupt must be 'skip' or 'fail', not {on_corrupt!r}")
  if num_shards < 1 or workers < 1:
    raise UserError(f'--num-shards and --workers must be >= 1 ({num_shards}, {workers})')
  classes = list_classes(os.path.join(src_dir, splits[0]))
  plans = {s: list_images(os.path.join(src_dir, s), classes) for s in splits}
  for split, items in plans.items():
    if not items:
      raise UserError(f'no images under {os.path.join(src_dir, split)!r}')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f'the output is a file, expected a directory ({out_dir})')
  os.makedirs(out_dir, exist_ok=True)
  staging = tempfile.mkdtemp(dir=out_dir, prefix='.partial-')
  try:
    counts = {s: write_split(items, staging, s, num_shards, on_corrupt, workers)
              for s, items in plans.items()}
    with open(os.path.join(staging, data.LABELS_FILE), 'w') as f:
      json.dump(classes, f, indent=1)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return counts


def _prepare(argv):
  parser = cli.ArgumentParser(prog=os.path.basename(argv[0]),
                              description=__doc__.splitlines()[0])
  parser.add_argument('src_dir', help='contains <split>/<class>/<image>')
  parser.add_argument('out_dir')
  parser.add_argument('--num-shards', type=int, default=1)
  parser.add_argument('--on-corrupt', choices=('skip', 'fail'), default='fail')
  parser.add_argument('--splits', default='train,val',
                      help='comma-separated; the first one defines the classes')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='processes decoding images to check them')
  args = parser.parse_args(argv[1:])
  counts = prepare(args.src_dir, args.out_dir, splits=tuple(args.splits.split(',')),
                   num_shards=args.num_shards, on_corrupt=args.on_corrupt,
                   workers=args.workers)
  for split, (written, skipped) in counts.items():
    print(f'{split}: {written} images written, {skipped} unreadable skipped')


def main(argv=None):
  return cli.run(_prepare, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
