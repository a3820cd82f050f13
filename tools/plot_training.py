r"""Training curves of several runs side by side (loss, held-out top-1, learning rate,
sign-flip rate), read from each WORKDIR/metrics.jsonl of `bhvit_jax.train`.

  python tools/plot_training.py runs/demo runs/demo_reg --labels 'no reg,reg 0.1' --out runs.png

Labels default to the workdirs' base names.
"""
import os
import sys

from bhvit_jax import cli
from bhvit_jax import plots


def parse_args(argv):
  parser = cli.ArgumentParser(prog=os.path.basename(argv[0]),
                              description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='training workdirs (with metrics.jsonl)')
  parser.add_argument('--out', default='runs.png', help='PNG to write')
  parser.add_argument('--labels', default='', help='comma-separated, one per workdir')
  args = parser.parse_args(argv[1:])
  labels = args.labels.split(',') if args.labels else [
      os.path.basename(os.path.normpath(w)) for w in args.workdirs]
  if len(labels) != len(args.workdirs):
    parser.error(f'--labels has {len(labels)} names for {len(args.workdirs)} workdirs')
  if len(set(labels)) != len(labels):
    parser.error(f'labels must be distinct, got {labels}; pass --labels')
  return args, labels


def _plot(argv):
  args, labels = parse_args(argv)
  with cli.output_file(args.out) as tmp:
    runs = {label: plots.read_history(w) for label, w in zip(labels, args.workdirs)}
    plots.plot_runs(runs, tmp)
  print(f'wrote {args.out}')


def main(argv=None):
  return cli.run(_plot, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
