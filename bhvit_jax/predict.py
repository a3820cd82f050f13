r"""Top-k classes of images with an exported BHViT, without JAX (numpy, PIL, IREE/ONNX runtime).

  python -m bhvit_jax.predict --artifact model.vmfb --images photos/ cat.jpg --top 5
  python -m bhvit_jax.predict --artifact model.vmfb --images photos/ --out predictions.jsonl

Prints one line per image: its path and the top classes with softmax probabilities. --out also
writes one JSON object per image (`path`, `top`: [[class, probability], ...], `logits`); it is
written to a temporary file and renamed, so a failed run leaves no partial file. Every image
is decoded before the model runs: one unreadable image stops the run with one error line.
"""
import argparse
import json
import os
import sys

import numpy as np

from bhvit_jax import deploy_runtime


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m bhvit_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--artifact', required=True, help='.vmfb or .onnx of tools/export_deploy.py')
  parser.add_argument('--images', required=True, nargs='+', help='image files or directories')
  parser.add_argument('--top', type=int, default=5, help='classes shown per image')
  parser.add_argument('--out', default='', help='also write JSON lines here')
  return parser.parse_args(argv)


def predict(artifact: str, images, top: int = 5) -> list:
  """[{'path', 'top': [[class, probability], ...], 'logits'}] for the image files/dirs."""
  if top < 1:
    raise deploy_runtime.DeployError(f'--top must be at least 1, not {top}')
  model = deploy_runtime.Model(artifact)
  files = deploy_runtime.image_files(images)
  batch = np.stack([model.preprocess(deploy_runtime.load_image(f)) for f in files])
  logits = model.predict_logits(batch)
  names = model.meta.get('class_names') or [str(i) for i in range(logits.shape[-1])]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  results = []
  for path, row, p in zip(files, logits, probs):
    order = np.argsort(-row, kind='stable')[:top]
    results.append({'path': path, 'top': [[names[i], float(p[i])] for i in order],
                    'logits': [float(x) for x in row]})
  return results


def write_jsonl(results, path: str):
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      for record in results:
        f.write(json.dumps(record) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv=None):
  args = parse_args(argv)
  try:
    results = predict(args.artifact, args.images, args.top)
    if args.out:
      write_jsonl(results, args.out)
  except (deploy_runtime.DeployError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for record in results:
    shown = ', '.join(f'{name} {p:.3f}' for name, p in record['top'])
    print(f"{record['path']}: {shown}")


if __name__ == '__main__':
  main()
