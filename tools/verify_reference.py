"""Compares bhvit_jax with a fixture recorded from the official PyTorch BHViT.

  python tools/verify_reference.py ../shared/fixtures/case_public.npz [--x64] [--json]
  python tools/verify_reference.py ../shared/fixtures/steps_public.npz --x64 --json

A `case_*.npz` checks the forward (eval and train mode), cross-entropy, every gradient,
BatchNorm running statistics and the regularizer; a `steps_*.npz` checks one training step of
the project's own optimizer chain. `--x64` runs in float64 and compares with the fixture's
float64 replay (the judge: every sign decision is the reference's). Exit status 1 on failure.
"""
import json
import os
import sys

from bhvit_jax import cli


def _verify(argv):
  parser = cli.ArgumentParser(prog=os.path.basename(argv[0]),
                              description=__doc__.split('\n\n')[0])
  parser.add_argument('fixture', help='path to a case_*.npz or steps_*.npz fixture')
  parser.add_argument('--x64', action='store_true', help='float64 (compare with f64/*)')
  parser.add_argument('--json', action='store_true', help='last line: one JSON object')
  args = parser.parse_args(argv[1:])
  cli.input_path(args.fixture, 'fixture')
  import jax  # pylint: disable=g-import-not-at-top  (x64 is set before any array exists)
  jax.config.update('jax_enable_x64', args.x64)
  from bhvit_jax import reference  # pylint: disable=g-import-not-at-top
  is_steps = os.path.basename(args.fixture).startswith('steps_')
  report = (reference.check_steps if is_steps else reference.check_case)(args.fixture, args.x64)
  if args.json:
    print(json.dumps(report))
  else:
    for key, value in report.items():
      print(f'{key:>14}: {value}')
    print('PASSED' if report['passed'] else 'FAILED')
  return 0 if report['passed'] else 1


def main(argv=None):
  return cli.run(_verify, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
