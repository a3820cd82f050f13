"""Converts an ImageFolder tree into ArrayRecord shards for data.name='imagefolder'.

  python tools/prepare_imagefolder.py SRC_DIR OUT_DIR [--num-shards N] [--splits train,val]

SRC_DIR/<split>/<class>/<image> becomes OUT_DIR/<split>.array_record-IIIII-of-NNNNN
(records: bhvit_jax.data.encode_record(original bytes, label)) plus
OUT_DIR/labels.json, the class names of the first split sorted by folder name (label =
position), as torchvision's ImageFolder assigns them.

Which files count: torchvision's extensions (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp,
any case), anywhere under a class folder; other files are ignored and counted. A class folder
that is empty, or missing from a later split, keeps its label. The original bytes are stored:
grey, RGBA, palette, CMYK and 16-bit images are converted to RGB when read, by PIL's
`.convert('RGB')` as the reference's loader does, and EXIF orientation is not applied (PIL does
not apply it either). A file that does not fully decode (truncated, 0 bytes) stops the
conversion with one line naming it, or with --on-corrupt=skip is left out and counted.

OUT_DIR is replaced as a whole: the shards are written into a fresh directory beside it that
is renamed into place when every split is complete, so a re-run (e.g. with another
--num-shards) leaves exactly one set and an interrupted run leaves the previous data intact.
OUT_DIR must hold nothing but a previous conversion.
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
from bhvit_jax import config_lib
from bhvit_jax import data


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
              raise config_lib.UserError(
                  f'unreadable image {image_path!r}: {reason} (--on-corrupt=skip leaves such '
                  'files out)')
            print(f'skipping unreadable image {image_path!r}: {reason}', file=sys.stderr)
            skipped += 1
            continue
          writer.write(data.encode_record(raw, label))
          written += 1
      finally:
        writer.close()
  return written, skipped


def _check_replaceable(out_dir: str):
  """Refuses to replace a directory holding anything but a previous conversion."""
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise config_lib.UserError(f'output {out_dir!r} exists and is not a directory')
  foreign = sorted(n for n in os.listdir(out_dir)
                   if n != data.LABELS_FILE and '.array_record-' not in n)
  if foreign:
    raise config_lib.UserError(
        f'output {out_dir!r} holds files that are not shards of a conversion ({foreign[:3]}); '
        'choose another directory')


def _swap_into_place(new_dir: str, out_dir: str):
  """Renames `new_dir` to `out_dir`, removing a previous `out_dir` only once it is replaced."""
  if not os.path.exists(out_dir):
    os.rename(new_dir, out_dir)
    return
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-',
                         dir=os.path.dirname(out_dir))
  old_data = os.path.join(old, 'data')
  os.rename(out_dir, old_data)
  os.rename(new_dir, out_dir)
  shutil.rmtree(old)


def prepare(src_dir: str, out_dir: str, *, splits=('train', 'val'), num_shards: int = 1,
            on_corrupt: str = 'fail', workers: int = 1) -> dict[str, dict[str, int]]:
  """Converts every split; returns {split: {'written', 'skipped', 'ignored'}}."""
  if on_corrupt not in ('skip', 'fail'):
    raise config_lib.UserError(f"on_corrupt must be 'skip' or 'fail', not {on_corrupt!r}")
  if num_shards < 1:
    raise config_lib.UserError(f'--num-shards must be >= 1, not {num_shards}')
  out_dir = os.path.abspath(out_dir)
  classes = data.list_classes(os.path.join(src_dir, splits[0]))
  plans = {s: data.list_images(os.path.join(src_dir, s), classes) for s in splits}
  for split, (items, _) in plans.items():
    if not items:
      raise config_lib.UserError(f'no images under {os.path.join(src_dir, split)!r}')
  _check_replaceable(out_dir)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  new_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.new-',
                             dir=os.path.dirname(out_dir))
  try:
    counts = {}
    for split, (items, ignored) in plans.items():
      written, skipped = write_split(items, new_dir, split, num_shards, on_corrupt, workers)
      counts[split] = {'written': written, 'skipped': skipped, 'ignored': ignored}
    with open(os.path.join(new_dir, data.LABELS_FILE), 'w') as f:
      json.dump(classes, f, indent=1)
    _swap_into_place(new_dir, out_dir)
  finally:
    shutil.rmtree(new_dir, ignore_errors=True)
  return counts


def _prepare(argv):
  parser = cli.ArgumentParser(prog=os.path.basename(argv[0]),
                              description=__doc__.splitlines()[0])
  parser.add_argument('src_dir', help='contains <split>/<class>/<image>')
  parser.add_argument('out_dir', help='replaced as a whole when the conversion is complete')
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
  for split, c in counts.items():
    print(f"{split}: {c['written']} images written, {c['skipped']} unreadable skipped, "
          f"{c['ignored']} non-image files ignored")


def main(argv=None):
  return cli.run(_prepare, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
