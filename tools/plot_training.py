r"""Training curves of several runs side by side (loss, held-out top-1, learning rate,
sign-flip rate), read from each WORKDIR/metrics.jsonl of `bhvit_jax.train`.

  python tools/plot_training.py runs/demo runs/demo_reg --labels 'no reg,reg 0.1' --out runs.png

Labels default to the workdirs' base names.
"""
import argparse
import os
import sys

from bhvit_jax import plots


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='training workdirs (with metrics.jsonl)')
  parser.add_argument('--out', default='runs.png', help='PNG to write')
  parser.add_argument('--labels', default='', help='comma-separated, one per workdir')
  args = parser.parse_args(argv)
  labels = args.labels.split(',') if args.labels else [
      os.path.basename(os.path.normpath(w)) for w in args.workdirs]
  if len(labels) != len(args.workdirs):
    parser.error(f'--labels has {len(labels)} names for {len(args.workdirs)} workdirs')
  if len(set(labels)) != len(labels):
    parser.error(f'labels must be distinct, got {labels}; pass --labels')
  return args, labels


def main(argv=None):
  args, labels = parse_args(argv)
  try:
    runs = {label: plots.read_history(w) for label, w in zip(labels, args.workdirs)}
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {plots.plot_runs(runs, args.out)}')


if __name__ == '__main__':
  main()
