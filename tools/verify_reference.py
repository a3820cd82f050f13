"""Judges bhvit_jax against a fixture recorded from the official PyTorch BHViT.

  python tools/verify_reference.py ../shared/fixtures/case_public.npz [--x64] [--json]
  python tools/verify_reference.py ../shared/fixtures/steps_public.npz --x64 --json
  python tools/verify_reference.py my_case.npz --x64      # from tools/record_reference.py

A fixture may hold any subset of the documented parts (forward, gradients, BatchNorm running
statistics, regularizer, non-gsb calibration, training steps, float64 replays): the absent
ones are listed as absent and the rest is judged. `--x64` runs in float64 and compares with
the fixture's float64 replay (the judge: every sign decision is the reference's; logits must
agree within 1e-10 and every gradient tensor within 1e-10 of the float64 gradients where the
fixture holds them (`f64/grad/*`), else within 1e-3 of the float32 ones; the five worst are
listed).
Exit status 0 when every present part passed, 1 when one failed, 2 when the file is not a
fixture.
"""
import json
import os
import sys

from bhvit_jax import cli


def _verify(argv):
  parser = cli.ArgumentParser(prog=os.path.basename(argv[0]),
                              description=__doc__.split('\n\n')[0])
  parser.add_argument('fixture', help='path to a fixture .npz (case, steps or both)')
  parser.add_argument('--x64', action='store_true', help='float64 (compare with f64/*)')
  parser.add_argument('--json', action='store_true', help='last line: one JSON object')
  args = parser.parse_args(argv[1:])
  cli.input_path(args.fixture, 'fixture')
  import jax  # pylint: disable=g-import-not-at-top  (x64 is set before any array exists)
  jax.config.update('jax_enable_x64', args.x64)
  from bhvit_jax import reference  # pylint: disable=g-import-not-at-top
  report = reference.judge(args.fixture, args.x64)
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
