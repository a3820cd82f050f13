r"""Command line of training: `python -m bhvit_jax.train --config configs/demo.py --workdir W`.

(`python -m bhvit_jax.main` is the same program.) On Linux with CPU JAX the process re-executes
itself once with the malloc tunables of `bhvit_jax.hostmem` before JAX starts. Errors follow
the contract of `bhvit_jax.cli`.
"""
import os
import sys

from absl import flags
from absl import logging as absl_logging

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import cli
from bhvit_jax import config_lib
from bhvit_jax import hostmem
from bhvit_jax import train


def define_flags(flag_values, argv):
  cli.define_config(flag_values, argv, 'Training configuration file.')
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.',
                      flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def check_workdir(workdir: str):
  """A missing workdir is created (parents too); a file in its place is an error."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.UserError(f'--workdir is a file, expected a directory ({workdir})')


def _train(f, argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines drown the bar
  config_lib.validate(f.config)
  check_workdir(f.workdir)
  if f.config.get('task') == 'segmentation':
    from bhvit_jax import segmentation  # pylint: disable=g-import-not-at-top
    _, summary = segmentation.train_and_evaluate(f.config, f.workdir)
    print(f"held-out mIoU: {summary['miou']:.2f}%")
    return 0
  try:
    _, summary = train.train_and_evaluate(f.config, f.workdir)
  except (train.NonFiniteError, ckpt_lib.CheckpointReadError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if summary['top1'] is None:
    print(f"stopped at step {summary['step']}; checkpoint saved, rerun the same command to "
          'resume.')
  else:
    print(f"held-out top-1: {summary['top1']:.2f}%")
  print(f"training plot: {summary['plot']}")
  return 0


def main(argv=None):
  return cli.run(_train, define_flags, argv)


def run():
  hostmem.tune_malloc()
  sys.exit(main())


if __name__ == '__main__':
  run()
